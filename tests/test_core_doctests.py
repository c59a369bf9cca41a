"""Every docstring example of the package runs and prints what it says (``doctest.testmod`` per module).

A module added later is picked up automatically.
Run: ``PYTHONPATH=src pytest -q tests/test_core_doctests.py``.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import entropy_probe

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(entropy_probe.__path__, "entropy_probe.")
    if not m.name.endswith("__main__")
    # verl_ray imports verl (the optional extra) at import; tests/verl_engine imports it in .venv-verl
    and not (m.name.endswith("verl_ray") and importlib.util.find_spec("verl") is None)
)  # importing __main__ runs the command line
# the modules whose examples document the core (each must keep at least one example)
WITH_EXAMPLES = [
    "entropy_probe.batch",
    "entropy_probe.probe",
    "entropy_probe.statistics",
    "entropy_probe.toy",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (see output)"
    if name in WITH_EXAMPLES:
        assert result.attempted > 0
