"""Recorded runs: the JSON file a command writes (``--record PATH``) for the figures the docs quote.

A record holds what the command measured (``data``: the command's own JSON output), what it printed
(``console``), the command line and the package versions it ran on. ``docs/records/*.json`` are
records; ``make figures`` rewrites them and ``tests/test_doc_figures.py`` checks every figure quoted in
README.md and docs/*.md against them (docs/design.md, section 12).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

# The packages whose version can change a figure; a record is only as reproducible as these.
VERSIONED = ("torch", "transformers", "trl", "numpy", "accelerate", "datasets")


def versions() -> dict[str, str]:
    """The installed version of every package in ``VERSIONED`` (absent ones left out) and of Python."""
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def pop_record_option(argv: list[str]) -> tuple[list[str], Path | None]:
    """``argv`` without ``--record PATH`` (or ``--record=PATH``), and that path (None when absent)."""
    rest, path = [], None
    args = iter(argv)
    for arg in args:
        if arg == "--record":
            value = next(args, None)
            if value is None or value.startswith("-"):
                raise ValueError("--record needs a path, e.g. --record docs/records/demo.json")
            path = Path(value)
        elif arg.startswith("--record="):
            path = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return rest, path


class _Tee(io.TextIOBase):
    """Writes to the real stream and keeps a copy (what the command printed, for the record)."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:  # rich: no live redrawing, the plain final output, as in a log file
        return False


@contextlib.contextmanager
def capturing_stdout(width: int = 80):
    """Inside: stdout is copied into the yielded buffer; rich consoles created inside are ``width``
    columns wide (the console text in a record, and so the docs quoting it, must not depend on the
    terminal that ran ``make figures``)."""
    tee, old_columns = _Tee(sys.stdout), os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        with contextlib.redirect_stdout(tee):
            yield tee.copy
    finally:
        if old_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old_columns


def write_record(path: Path, command: list[str], data: dict, console: str | None = None) -> Path:
    """Write the record of one run: ``command`` (argv), ``versions()``, ``data`` and ``console``."""
    record = {
        "command": shlex.join(command),
        "versions": versions(),
        "data": data,
        "console": console,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return path
