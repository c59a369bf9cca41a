"""``entropy-probe demo``: GRPO on a digit-sorting task with the probe forecasting every step.

``config`` (options and command line), ``task`` (the sorting task), ``train`` (the GRPO loop with the
probe), ``fresh`` (fresh-sample entropy in the run's functional, the trainer's logged entropy),
``report`` (summary, files, plot, table), ``entropy_plot`` (entropy.png), ``guarded``
(``entropy-probe demo-guard``: unguarded vs ``--entropy-budget``, same seed). See docs/demo.md.
"""

from __future__ import annotations

from .config import DemoConfig, parse_args
from .train import run

__all__ = ["DemoConfig", "main", "parse_args", "run"]


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0
