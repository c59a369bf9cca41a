"""The second-order forecast (DESIGN section 12): per-unit q_n -> ``delta_h2``, ``forecast`` and their SEs.

``delta_h2 = (eta^2/2) mean_n q_n``; ``forecast = delta_h1 + delta_h2`` with its SE from the per-unit
combined values ``eta s_n + (eta^2/2) q_n`` (one E unit carries both terms, so they are correlated).
Float64 moments are merged over ranks like the first order's, and the q_n gathered in rank order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import merged_moments
from .engines.token_second_order import eval_token_taylor
from .statistics import conditional_variance, jackknife_se, moments_update
from .token_functional import unit_value_derivatives


@dataclass
class SecondOrder:
    """The second-order term and the forecast, over all ranks."""

    q: Tensor  # (B_E,) float64 q_n, rank order
    delta_h2: float
    se_delta_h2: float
    forecast: float
    se_forecast: float


def second_order_statistics(
    comm, q_local: Tensor, s: Tensor, sizes: list[int], unit_ids: Tensor, delta_h1: float, lr: float
) -> SecondOrder:
    """From this rank's ``(B_local,)`` q_n and every rank's s_n (``s``, rank order, ``sizes`` per rank)."""
    q = comm.gather(q_local, sizes)  # (B_E,) rank order, as the s_n
    bad = (~torch.isfinite(q)).nonzero()
    if len(bad):
        unit = int(bad[0, 0])
        raise ValueError(
            f"eval_batch: q_n (second order) is not finite for unit {int(unit_ids[unit])} (position {unit})"
        )
    half = 0.5 * lr * lr
    start = sum(sizes[: comm.rank])
    s_local = s[start : start + sizes[comm.rank]].double().to(q_local.device)  # this rank's s_n
    no_extra = torch.zeros(0, device=q_local.device)
    m_q, _, _ = merged_moments(comm, moments_update(q_local), no_extra)
    m_c, _, _ = merged_moments(comm, moments_update(lr * s_local + half * q_local), no_extra)
    _, se_q = conditional_variance(m_q, 1.0)
    _, se_c = conditional_variance(m_c, 1.0)
    delta_h2 = half * float(m_q.mean)
    return SecondOrder(
        q=q, delta_h2=delta_h2, se_delta_h2=half * se_q, forecast=delta_h1 + delta_h2, se_forecast=se_c
    )


def second_order_fields(second: SecondOrder | None) -> dict:
    """The ``ProbeResult`` fields of the second order (none when it is off)."""
    if second is None:
        return {}
    return dict(
        delta_h2=second.delta_h2,
        se_delta_h2=second.se_delta_h2,
        forecast=second.forecast,
        se_forecast=second.se_forecast,
        per_unit_q=second.q.detach().cpu(),
    )


def token_second_order_statistics(
    comm, taylor_local: Tensor, s: Tensor, unit_ids: Tensor, delta_h1: float, lr: float, ratio: bool = True
) -> SecondOrder:
    """The second order of the token-level entropy, from this rank's ``(B_local, 3, 2)`` ``unit_taylor``
    rows (``engines.token_second_order``) and every rank's s_n (``s``, rank order).

    The ratio needs every unit, so the rows are gathered first (rank order) and every rank forms the same
    q_n (``token_functional.unit_value_derivatives``); the SEs are ``std / sqrt(B)`` of the per-unit
    values, as for the first order's s_n. ``ratio`` False: the numerator alone (``entropy="sequence"``
    with "sum" weighting).
    """
    taylor = comm.gather(taylor_local)  # (B_E, 3, 2) rank order, as the s_n
    _, _, q = unit_value_derivatives(taylor, ratio)
    bad = (~torch.isfinite(q)).nonzero()
    if len(bad):
        unit = int(bad[0, 0])
        raise ValueError(
            f"eval_batch: q_n (second order) is not finite for unit {int(unit_ids[unit])} (position {unit})"
        )
    half = 0.5 * lr * lr
    combined = lr * s.double().to(q.device) + half * q  # (B_E,) per-unit forecast
    delta_h2 = half * float(q.mean())
    return SecondOrder(
        q=q,
        delta_h2=delta_h2,
        se_delta_h2=jackknife_se(q, half),
        forecast=delta_h1 + delta_h2,
        se_forecast=jackknife_se(combined, 1.0),
    )


def token_second_order(module, params, batch, v, cfg, comm, stats, lr: float) -> SecondOrder:
    """The token functional's second order in a probe call: ``engines.token_second_order`` on this rank's
    E units (``batch`` None: none), then ``token_second_order_statistics`` over every rank's."""
    taylor = torch.zeros(0, 3, 2, dtype=torch.float64, device=stats.s.device)
    if batch is not None:
        taylor = eval_token_taylor(module, params, batch, v, cfg.temperature, cfg.microbatch_units)
    ratio = cfg.entropy == "token"
    return token_second_order_statistics(comm, taylor, stats.s, stats.unit_ids, stats.delta_h1, lr, ratio)
