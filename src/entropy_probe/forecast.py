"""The second-order forecast (docs/design.md section 8): per-unit q_n -> ``delta_h2``, ``forecast`` and
their SEs.

``delta_h2 = (eta^2/2) mean_n q_n``; ``forecast = delta_h1 + delta_h2`` with its SE from the per-unit
combined values ``eta s_n + (eta^2/2) q_n`` (one E unit carries both terms, so they are correlated).
Float64 moments are merged over ranks like the first order's, and the q_n gathered in rank order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import RolloutBatch
from .context import ProbeCall
from .distributed import merged_moments
from .engines import EvalProjections, TokenProjections
from .engines.token_second_order import eval_token_taylor
from .eval_statistics import EvalStatistics
from .response_tokens import ResponseTokens
from .result import SecondOrderForecast
from .statistics import conditional_variance, moments_update
from .token_functional import unit_value_derivatives
from .token_statistics import projections_from_pieces
from .vectors import Vector, device_of


def second_order_statistics(call: ProbeCall, q_local: Tensor, stats: EvalStatistics) -> SecondOrderForecast:
    """``result.second`` from this rank's ``(B_local,)`` q_n and the statistics over E (every rank's s_n and
    q_n, gathered in rank order by ``eval_statistics``)."""
    comm, lr, sizes, s, q = call.comm, call.lr, stats.sizes, stats.s, stats.q
    bad = (~torch.isfinite(q)).nonzero()
    if len(bad):
        unit = int(bad[0, 0])
        unit_id = int(stats.unit_ids[unit])
        raise ValueError(f"eval_batch: q_n (second order) is not finite for unit {unit_id} (position {unit})")
    half = 0.5 * lr * lr
    start = sum(sizes[: comm.rank])
    s_local = s[start : start + sizes[comm.rank]].double().to(q_local.device)  # this rank's s_n
    no_extra = torch.zeros(0, device=q_local.device)
    m_q, _, _ = merged_moments(comm, moments_update(q_local), no_extra)
    m_c, _, _ = merged_moments(comm, moments_update(lr * s_local + half * q_local), no_extra)
    _, se_q = conditional_variance(m_q, 1.0)
    _, se_c = conditional_variance(m_c, 1.0)
    delta_h2 = half * float(m_q.mean)
    return SecondOrderForecast(
        delta_h2=delta_h2,
        se_delta_h2=half * se_q,
        forecast=stats.delta_h1 + delta_h2,
        se_forecast=se_c,
        per_unit_q=q.detach().cpu(),
    )


def token_second_order_pass(call: ProbeCall, batch: RolloutBatch | None, v: Vector) -> Tensor:
    """This rank's ``(B_local,)`` float64 q_n of the token-level entropy (or of the sequence "sum"
    numerator), for ``eval_statistics`` to gather with the s_n like the sequence functional's.

    The nested forward-mode pass runs on this rank's units (``engines.token_second_order``); the ratio
    needs every unit, so the ``(B, 3, 2)`` Taylor rows of all ranks are gathered (rank order, one
    collective, also by a rank holding no unit) and every rank differentiates the same per-unit values
    (``token_functional.unit_value_derivatives``), keeping its own units' q_n.
    """
    cfg = call.config
    taylor = torch.zeros(0, 3, 2, dtype=torch.float64, device=device_of(call.params))
    if batch is not None:
        taylor = eval_token_taylor(call.module, call.params, batch, v, cfg.temperature, cfg.microbatch_units)
    return _local_q(call, taylor, _unit_counts(call, taylor))


def _unit_counts(call: ProbeCall, taylor: Tensor) -> list[int]:
    """Every rank's number of E units, rank order (one collective, also by a rank holding none)."""
    local = torch.tensor([taylor.shape[0]], device=taylor.device)
    return [int(c) for c in call.comm.stack(local).reshape(-1).tolist()]


def _local_q(call: ProbeCall, taylor: Tensor, counts: list[int]) -> Tensor:
    """This rank's q_n from its ``(B_local, 3, 2)`` Taylor rows: every rank's rows gathered, the same
    per-unit values differentiated on every rank, this rank's slice kept."""
    every = call.comm.gather(taylor, counts)  # (B_E, 3, 2) rank order
    _, _, q = unit_value_derivatives(every, call.config.entropy == "token")
    start = sum(counts[: call.comm.rank])
    return q[start : start + taylor.shape[0]]


def shared_token_pass(
    call: ProbeCall, batch: RolloutBatch | None, v: Vector
) -> tuple[EvalProjections, Tensor]:
    """First and second order through the exact H_t from one nested forward-mode pass over this rank's E
    (``ProbeConfig.shares_second_order_pass``): (this rank's projections, its ``(B_local,)`` q_n).

    The pass's Taylor rows hold each unit's ``(N_n, D_n)`` and their first derivatives along v, the
    pieces the first-order engines compute (``test_token_truth``: the same s_n unit by unit), so they go
    through the same ``projections_from_pieces`` and the E pass is not run again; its per-token l_k, H_k
    at theta are kept for ``measure_change`` as the E pass keeps them, its dS_i for the large-step
    diagnostic as the jvp engine's (no stepped forward then). The q_n are
    ``token_second_order_pass``'s, from the same rows (no by_group, no halves: those need the E pass).
    """
    cfg, device = call.config, device_of(call.params)
    taylor = torch.zeros(0, 3, 2, dtype=torch.float64, device=device)
    tokens = d_seq = None
    if batch is not None:
        tokens = ResponseTokens.zeros(batch)
        d_seq = torch.empty(batch.n_sequences, dtype=torch.float32, device=device)  # (N,)
        taylor = eval_token_taylor(
            call.module, call.params, batch, v, cfg.temperature, cfg.microbatch_units, tokens, d_seq
        )
    counts = _unit_counts(call, taylor)
    n_local = taylor.shape[0]
    tp = TokenProjections.empty(n_local, 0 if batch is None else batch.n_sequences, v, False, None, device)
    tp.pieces = taylor[:, :2, :].reshape(n_local, 4).clone()  # (B, 4): N, D, dN, dD
    if tokens is not None:
        m = tokens.mask
        tp.sums = torch.stack([tokens.entropy.double()[m].sum(), m.sum().double()])  # sum m H, sum m
        tp.seq_logprob, tp.tokens, tp.d_seq = tokens.seq, tokens, d_seq
    return projections_from_pieces(call, tp, counts), _local_q(call, taylor, counts)
