"""Engines for the per-unit projections: the one place that dispatches on ``ProbeConfig.engine``.

``backward`` (one reverse pass per E unit, the note's loop) and ``jvp`` (forward mode, a microbatch
of units per pass) compute the same numbers (DESIGN section 7); ``update_gradient`` (grad J_U) is
reverse mode whichever engine is configured.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import fsdp
from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..vectors import Params, Vector
from . import backward, jvp, second_order
from .backward import unit_gradients, update_gradient
from .projections import EvalProjections

__all__ = ["EvalProjections", "eval_projections", "eval_second_order", "unit_gradients", "update_gradient"]


def eval_projections(
    module: nn.Module,
    params: Params,
    batch: RolloutBatch,
    v: Vector,
    cfg: ProbeConfig,
    halves: Tensor | None = None,
    want_groups: bool = False,
) -> EvalProjections:
    """s_n = v . X_n for every unit of ``batch`` by the configured engine; with ``halves`` (``(B_E,)``
    0 or 1 per unit) also the sums of the X_n over the two halves of E.

    ``want_groups`` (``by_group``) needs the backward engine's per-unit loop whatever the engine: the jvp
    engine would need one forward-mode pass per group (docs/performance.md).
    """
    if fsdp.is_sharded(
        params
    ):  # FSDP2: every rank runs every unit's backward (fsdp.py); groups refused there
        return fsdp.eval_projections(module, params, batch, v, cfg)
    if want_groups or cfg.engine != "jvp":
        return backward.eval_projections(module, params, batch, v, cfg, halves, want_groups)
    return jvp.eval_projections(module, params, batch, v, cfg, halves)


def eval_second_order(
    module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, cfg: ProbeConfig
) -> Tensor:
    """``(B_E,)`` float64 q_n (DESIGN section 12), one nested forward-mode pass whatever the engine."""
    return second_order.eval_second_order(module, params, batch, v, cfg)
