"""``entropy-probe`` command line: ``demo`` (the main job) and ``validate`` (calibration checks).

Run ``entropy-probe --help``; each sub-command has its own ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="entropy-probe", description=__doc__.splitlines()[0])
    parser.add_argument(
        "command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[1]}" for k, v in COMMANDS.items())
    )
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the error and exits
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
