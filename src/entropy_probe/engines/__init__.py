"""Engines for the per-unit projections: the one place that dispatches on ``ProbeConfig.engine``.

``backward`` (one reverse pass per E unit, the note's loop) and ``jvp`` (forward mode, a microbatch
of units per pass) compute the same numbers (DESIGN section 7); ``update_gradient`` (grad J_U) is
reverse mode whichever engine is configured.
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import fsdp
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
    """Whether E is read through the exact H_t (``token_entropy``): the token-level entropy, and the
    sequence-level "sum" functional, whose numerator it is (``E[sum_t m_t H_t] = E[-S]``). The note's
    ``x_estimator="seed"`` keeps its own sampled-token form."""
    return cfg.entropy == "token" or (cfg.entropy_weighting == "sum" and cfg.x_estimator == "unbiased")


def token_projections(
    module: nn.Module,
    params: Params,
    batch: RolloutBatch,
    v: Vector,
    cfg: ProbeConfig,
    halves: Tensor | None = None,
    want_groups: bool = False,
) -> TokenProjections:
    """The token-level pieces of every unit of ``batch`` by the configured engine (by_group: the backward
    engine's per-unit loop, as for ``eval_projections``)."""
    if fsdp.is_sharded(params):
        raise NotImplementedError(
            f"FSDP2 model: ProbeConfig.entropy={cfg.entropy!r} with entropy_weighting="
            f"{cfg.entropy_weighting!r} is not supported yet; use entropy='sequence' (token-mean weighting)"
        )
    if want_groups or cfg.engine != "jvp":
        index = parameter_groups(params, cfg.groups)[1].to(batch.device) if want_groups else None
        return backward_token_projections(module, params, batch, v, cfg.temperature, halves, index)
    return jvp_token_projections(module, params, batch, v, cfg.temperature, cfg.microbatch_units, halves)


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
