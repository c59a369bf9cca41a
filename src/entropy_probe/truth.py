"""The truth: the entropy change the step really causes, measured on E (DESIGN section 6).

The step ``theta' = theta + alpha * eta * v`` is applied functionally (``torch.func.functional_call``),
so the live model is never modified. E was sampled at theta; the entropy at theta' is estimated with
self-normalised importance weights ``w_i = exp(S_i(theta') - S_i(theta))``. Units weigh equally
whatever their group size (as in the entropy target ``E_x E_y``):

    H_hat(theta') = sum_n (1/G_n) sum_{i in n} w_i h_i' / sum_n (1/G_n) sum_{i in n} w_i,  h_i' = -S_w,i(theta')

which is the design's ``sum_i w_i h_i' / sum_i w_i`` when every G_n is equal. At alpha = 0 every
weight is 1 and the change is exactly 0. SEs are delete-one-unit jackknives, also for the
difference truth - prediction (same E, so the two are correlated).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .batch import RolloutBatch
from .logprobs import sequence_logprobs
from .objectives import _group_sum
from .result import TruthResult
from .statistics import jackknife_se_of

Vector = dict[str, Tensor]


def stepped_parameters(params: dict[str, nn.Parameter], v: Vector, step: float) -> Vector:
    """``{name: theta + step * v}`` in each parameter's dtype (no autograd, the live model untouched)."""
    with torch.no_grad():
        return {name: (p.float() + step * v[name]).to(p.dtype) for name, p in params.items()}


@torch.no_grad()
def logprobs_at(module: nn.Module, params: Vector, batch: RolloutBatch, *, temperature: float, weighting: str,
                microbatch_units: int) -> tuple[Tensor, Tensor]:
    """``(S_i, S_w,i)`` of every sequence, ``(N,)`` fp32 in row order, under the given parameters."""
    seq = torch.empty(batch.n_sequences, dtype=torch.float32, device=batch.device)
    weighted = torch.empty_like(seq)
    for units, mb in batch.microbatches(microbatch_units):
        rows = batch.rows_of_units(units).to(seq.device)
        lp = sequence_logprobs(module, mb, temperature, weighting, params=params)
        seq[rows], weighted[rows] = lp.seq, lp.weighted
    return seq, weighted


def _unit_sums(batch: RolloutBatch, seq0: Tensor, w0: Tensor, seq1: Tensor, w1: Tensor) -> Tensor:
    """``(B, 5)`` float64 per-unit sums: numerator A_n, denominator D_n, base entropy C_n (each / G_n),
    and the sums of the importance weights and of their squares (for the ESS)."""
    g = batch.unit_sizes.to(seq0.device).double()
    weight = torch.exp(seq1.double() - seq0.double())  # (N,) importance weights
    num = _group_sum(weight * -w1.double(), batch) / g
    den = _group_sum(weight, batch) / g
    base = _group_sum(-w0.double(), batch) / g
    return torch.stack([num, den, base, _group_sum(weight, batch), _group_sum(weight * weight, batch)], dim=1)


def entropy_change(batch: RolloutBatch | None, seq0: Tensor, w0: Tensor, seq1: Tensor, w1: Tensor,
                   predicted_per_unit: Tensor | None = None, lr: float = 0.0, comm=None):
    """``(delta_h, se, ess, se_diff)`` from log-probs at theta (0) and theta' (1).

    ``predicted_per_unit``: the s_n; with ``lr`` it gives the jackknife of truth - prediction.
    ``comm``: under DDP the per-unit sums of every rank are gathered (rank order), so the ratio,
    the jackknife and the ESS are global; ``batch`` is None on a rank holding no E units.
    """
    sums = _unit_sums(batch, seq0, w0, seq1, w1) if batch is not None else torch.zeros((0, 5), dtype=torch.float64)
    if comm is not None:
        sums = comm.gather(sums)  # (B_E, 5) over all ranks
    num, den, base, w_sum, w2_sum = sums.unbind(dim=1)
    b = num.numel()
    delta = float(num.sum() / den.sum() - base.sum() / b)
    ess = float(w_sum.sum() ** 2 / w2_sum.sum())
    if b < 2:
        return delta, 0.0, ess, 0.0
    loo = (num.sum() - num) / (den.sum() - den) - (base.sum() - base) / (b - 1)  # delta_(-n)
    se = jackknife_se_of(loo)
    se_diff = 0.0
    if predicted_per_unit is not None:
        s = predicted_per_unit.double().to(loo.device)
        se_diff = jackknife_se_of(loo - lr * (s.sum() - s) / (b - 1))
    return delta, se, ess, se_diff


def measure_truth(module: nn.Module, params: dict[str, nn.Parameter], batch: RolloutBatch, v: Vector,
                  per_unit: Tensor, *, lr: float, alphas: tuple[float, ...], temperature: float, weighting: str,
                  microbatch_units: int, comm=None) -> TruthResult:
    """The truth at each alpha; the headline numbers are those at alpha = 1 when swept, else at the last alpha.

    The log-probs at theta are re-evaluated through the same microbatched forward as those at theta',
    so that at alpha = 0 the weights are exactly 1. Under DDP (``comm``) ``per_unit`` holds every
    rank's s_n and ``batch`` is this rank's share of E (None if it holds none).
    """
    if len(alphas) == 0:
        raise ValueError("truth alphas (ProbeConfig.truth_alphas) must hold at least one alpha, got ()")
    for a in alphas:
        if not math.isfinite(a):
            raise ValueError(f"truth alphas (ProbeConfig.truth_alphas) must be finite, got {a!r} in {tuple(alphas)!r}")
    opts = dict(temperature=temperature, weighting=weighting, microbatch_units=microbatch_units)
    seq0, w0 = logprobs_at(module, dict(params), batch, **opts) if batch is not None else (None, None)
    rows = []
    for alpha in alphas:
        seq1, w1 = None, None
        if batch is not None:  # a rank holding no E units contributes nothing to the gathered sums
            seq1, w1 = logprobs_at(module, stepped_parameters(params, v, alpha * lr), batch, **opts)
            _check_weights(seq0, seq1, alpha)
        # The prediction at alpha is alpha * delta_h1; its per-unit pieces scale the same way.
        rows.append(entropy_change(batch, seq0, w0, seq1, w1, per_unit * alpha, lr, comm=comm))
    deltas = [r[0] for r in rows]
    a = torch.tensor(alphas, dtype=torch.float64)
    d = torch.tensor(deltas, dtype=torch.float64)
    slope = float((a * d).sum() / (a * a).sum()) if float((a * a).sum()) > 0 else math.nan
    head = rows[list(alphas).index(1.0)] if 1.0 in alphas else rows[-1]
    return TruthResult(delta_h=head[0], se=head[1], ess=head[2], se_diff=head[3], alphas=list(alphas),
                       delta_h_at=deltas, se_at=[r[1] for r in rows], ess_at=[r[2] for r in rows],
                       se_diff_at=[r[3] for r in rows], slope=slope)


# exp(709.8) is the largest finite float64: beyond it a weight is inf and the SNIS ratio inf / inf = NaN.
MAX_LOG_WEIGHT = 700.0


def _check_weights(seq0: Tensor, seq1: Tensor, alpha: float) -> None:
    """The importance weights must be finite: a step that raises a log-prob by > 700 nats is an error."""
    log_ratio = seq1.double() - seq0.double()  # (N,)
    bad = (~torch.isfinite(log_ratio)) | (log_ratio > MAX_LOG_WEIGHT)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"truth at alpha={alpha!r}: the importance weight of eval sequence {row} is "
                         f"exp({float(log_ratio[row]):.4g}), not representable; the step is far too large")
