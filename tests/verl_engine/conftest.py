"""The verl tests run in their own environment (``make test-verl``: .venv-verl, verl 0.9.1 pins
transformers<5.11). The main run (``make test`` in .venv, without verl) leaves this folder out; under
``ENTROPY_PROBE_REQUIRE_VERL=1`` (``make test-verl``) a missing verl is a collection error, never a skip."""

import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
_SPEC = importlib.util.find_spec("verl")
HAVE_VERL = _SPEC is not None and _SPEC.origin is not None  # a namespace folder named verl is no verl

if not HAVE_VERL and os.environ.get("ENTROPY_PROBE_REQUIRE_VERL") == "1":
    raise ImportError("tests/verl_engine: verl is not installed in this environment; run `make test-verl`")

if HAVE_VERL:
    sys.path.insert(0, str(HERE))  # cpu_platform, verl_support


def pytest_configure(config):
    # verl announces each engine whose package is absent (megatron, torchtitan, ...): not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:.*engine is not available:UserWarning")


def pytest_ignore_collect(collection_path, config):
    if not HAVE_VERL and collection_path.is_relative_to(HERE):
        return True
    return None
