"""``entropy-probe`` command line: ``demo`` (the main job) and ``validate`` (calibration checks).

Run ``entropy-probe --help``; each sub-command has its own ``--help``. Every sub-command also takes
``--record PATH``: after the run, the JSON it wrote to its ``--out`` folder and what it printed are saved
as one record at PATH (``entropy_probe.records``; ``make figures`` writes docs/records/ this way).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from .records import capturing_stdout, pop_record_option, write_record

COMMANDS = {
    "demo": (
        "entropy_probe.demo",
        "GRPO fine-tuning of a tiny transformer with the probe forecasting every step",
    ),
    "demo-guard": (
        "entropy_probe.demo.guarded",
        "the demo unguarded and with EntropyGuard, same seed, side by side",
    ),
    "validate": (
        "entropy_probe.validation",
        "calibration and unbiasedness checks on a built-in enumerable policy",
    ),
}


# Where each command writes its JSON, for --record: (default --out folder, file name, more JSON files
# of the same run that the record keeps under their relative paths).
OUTPUTS = {
    "demo": ("runs/demo", "demo.json", ()),
    "demo-guard": ("runs/demo_guard", "demo_guard.json", ("unguarded/demo.json", "guarded/demo.json")),
    "validate": ("runs/validate", "validation.json", ()),
}


def output_folder(command: str, argv: list[str]) -> Path:
    """The folder ``command`` run with ``argv`` writes to: its --out, or the command's default."""
    folder = OUTPUTS[command][0]
    for i, arg in enumerate(argv):
        if arg == "--out" and i + 1 < len(argv):
            folder = argv[i + 1]
        elif arg.startswith("--out="):
            folder = arg.split("=", 1)[1]
    return Path(folder)


def recorded_data(command: str, argv: list[str]) -> dict:
    """What a record of ``command`` keeps: its JSON output, plus its other JSON files by path."""
    folder, (_, name, more) = output_folder(command, argv), OUTPUTS[command]
    data = json.loads((folder / name).read_text())
    data.update({path: json.loads((folder / path).read_text()) for path in more})
    return data


def run_recorded(command: str, argv: list[str], record: Path) -> int:
    """Run ``command`` and save its output JSON and its printed text as a record at ``record``."""
    module = importlib.import_module(COMMANDS[command][0])
    with capturing_stdout() as printed:
        status = int(module.main(argv) or 0)
    write_record(record, ["entropy-probe", command, *argv], recorded_data(command, argv), printed.getvalue())
    print(f"recorded {record}")
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, record = pop_record_option(argv)
    parser = argparse.ArgumentParser(prog="entropy-probe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the error and exits
        return 2
    if record is not None:
        return run_recorded(argv[0], argv[1:], record)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
