"""Engines for the per-unit projections: the one place that dispatches on ``ProbeConfig.eval_engine``.

``backward`` (one reverse pass per E unit, the note's loop) and ``jvp`` (forward mode, a microbatch
of units per pass) compute the same numbers (docs/design.md section 11); ``update_gradient`` (grad J_U) is
reverse mode whichever engine is configured. Which engine an E pass runs, and whether it splits s_n by
parameter group, the config decides (``ProbeConfig.eval_engine``, ``ProbeConfig.computes_groups``).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..attribution import parameter_groups
from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..vectors import Params, Vector
from . import backward, jvp, second_order
from .backward import unit_gradients, update_gradient
from .projections import EvalProjections
from .token import TokenProjections, backward_token_projections, jvp_token_projections

__all__ = [
    "EvalProjections",
    "TokenProjections",
    "eval_projections",
    "eval_second_order",
    "token_projections",
    "uses_token_pieces",
    "unit_gradients",
    "update_gradient",
]


def uses_token_pieces(cfg: ProbeConfig) -> bool:
    """Whether E is read through the exact H_t (``ProbeConfig.token_pieces``)."""
    return cfg.token_pieces


def token_projections(
    module: nn.Module,
    params: Params,
    batch: RolloutBatch,
    v: Vector,
    cfg: ProbeConfig,
    halves: Tensor | None = None,
) -> TokenProjections:
    """The token-level pieces of every unit of ``batch`` by ``cfg.eval_engine`` (with dN_n, dD_n by
    parameter group when ``cfg.computes_groups``), as ``eval_projections`` for the sequence functionals."""
    if cfg.eval_engine == "backward":
        index = parameter_groups(params, cfg.groups)[1].to(batch.device) if cfg.computes_groups else None
        return backward_token_projections(module, params, batch, v, cfg.temperature, halves, index)
    return jvp_token_projections(module, params, batch, v, cfg.temperature, cfg.microbatch_units, halves)


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
    """``(B_E,)`` float64 q_n (docs/design.md section 8), one nested forward-mode pass whatever the engine."""
    return second_order.eval_second_order(module, params, batch, v, cfg)
