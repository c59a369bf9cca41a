"""Engines for the per-unit projections: the one place that dispatches on ``ProbeConfig.eval_engine``.

``backward`` (one reverse pass per E unit, the note's loop) and ``jvp`` (forward mode, a microbatch
of units per pass) compute the same numbers (DESIGN section 7); ``update_gradient`` (grad J_U) is
reverse mode whichever engine is configured. Which engine an E pass runs, and whether it splits s_n by
parameter group, the config decides (``ProbeConfig.eval_engine``, ``ProbeConfig.computes_groups``).
"""

from __future__ import annotations

from torch import Tensor, nn

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
) -> EvalProjections:
    """s_n = v . X_n for every unit of ``batch`` by ``cfg.eval_engine`` (with s_n^(g) by parameter group
    when ``cfg.computes_groups``); with ``halves`` (``(B_E,)`` 0 or 1 per unit) also the sums of the
    X_n over the two halves of E."""
    if cfg.eval_engine == "backward":
        return backward.eval_projections(module, params, batch, v, cfg, halves, cfg.computes_groups)
    return jvp.eval_projections(module, params, batch, v, cfg, halves)


def eval_second_order(
    module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, cfg: ProbeConfig
) -> Tensor:
    """``(B_E,)`` float64 q_n (DESIGN section 12), one nested forward-mode pass whatever the engine."""
    return second_order.eval_second_order(module, params, batch, v, cfg)
