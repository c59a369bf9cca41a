"""The truth: the entropy change the step really causes, measured on E (docs/design.md section 10).

The step ``theta' = theta + alpha * eta * v`` is applied functionally (``torch.func.functional_call``),
so the live model is never modified. E was sampled at theta; the entropy at theta' is estimated with
importance weights ``w_i = exp(S_i(theta') - S_i(theta))`` and the leave-one-out baseline
``b_i = mean_{j != i} h_j`` (``h_j = -S_w,j(theta)``) as a control variate. Per unit,

    Delta_n = (1/G_n) sum_{i in n} [ w_i (h_i' - b_i) - (h_i - b_i) ]      h_i' = -S_w,i(theta')

and the change is ``mean_n Delta_n`` (units weigh equally whatever their group size, as in the
entropy target ``E_x E_y``). ``E[w_i] = 1`` and ``b_i`` does not depend on response i, so
``E[Delta_n]`` is exactly the unit's entropy change: no self-normalisation bias. And ``Delta_n`` is,
as a function of alpha, the function whose derivatives at 0 are the forecast's ``s_n`` and ``q_n``
(docs/design.md sections 4 and 8): truth - forecast on the same E is the Taylor remainder of one function,
``O(alpha^2)`` per unit for the first order and ``O(alpha^3)`` for the second. The self-normalised
ratio the truth used before, ``sum w h' / sum w``, has the global mean of E as its baseline instead,
which leaves a first-order difference ``eta (1/G) sum_i dS_i (b_i - mean h)`` between truth and
forecast: on the demo at alpha = 1/4 the SD of truth - forecast2 over 40 steps was 0.00106 nats with
the ratio and 0.00013 with the control variate (measured when the truth changed). At alpha = 0 every
weight is 1 and the change is exactly 0. SEs are over units (the delete-one-unit jackknife of a
mean), also for the difference truth - prediction (same E, so the two are correlated).

bf16/fp16 models (docs/design.md section 11): theta' is formed in fp32 and the model evaluated in fp32 at
theta and theta' (``full_precision_state``), so the truth sees steps below the parameters' rounding.

A step so large that a few sequences carry all the importance weight is a degenerate measurement:
when the effective sample size ``(sum w)^2 / sum w^2`` falls below ``ess_threshold(N)`` (10% of the N
E sequences, but at least min(8, N/2)) the change is flagged ``reliable = False`` with a
RuntimeWarning.

The log-probs at theta and theta' come from the call's passes (``passes.Passes.logprobs_stepped``).
Under FSDP2 the step is instead added in place to the local parameter shards, in their dtype, and
undone bit-exactly from a saved copy (``sharded_passes.ShardedPasses``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .batch import RolloutBatch
from .context import ProbeCall
from .logprobs import NonFiniteLogits, SequenceLogProbs
from .objectives import group_sum, per_sequence
from .result import TruthResult
from .statistics import jackknife_se
from .vectors import Params, Vector, device_of


def full_precision_state(module: nn.Module, params: Params) -> Vector | None:
    """fp32 copies of every floating parameter and buffer, when a trainable parameter is not fp32; else None.

    A bf16 parameter cannot take a step below its rounding (at lr 1e-6 most entries of a bf16 model do
    not move), so the truth of a bf16/fp16 model evaluates the model in fp32 at theta (exactly the
    bf16 values) and at theta + alpha eta v (in fp32): it measures the change of the function the
    model represents along the forecast's step, not the rounded step a bf16 optimizer would take.
    Costs one fp32 copy of the model for the duration of the truth.
    """
    if all(p.dtype == torch.float32 for p in params.values()):
        return None
    with torch.no_grad():
        state = dict(module.named_parameters())
        state.update(module.named_buffers())
        return {name: t.detach().float() for name, t in state.items() if t.is_floating_point()}


class Change(NamedTuple):
    """A measured entropy change: ``delta_h`` (nats), its ``se`` over E units, the importance weights'
    effective sample size ``ess``, and ``se_diff``, the SE of ``delta_h - prediction`` over E units
    (both the delete-one-unit jackknife of a mean over units, which is ``std / sqrt(B)``)."""

    delta_h: float
    se: float
    ess: float
    se_diff: float
    reliable: bool = True


ESS_MIN_FRACTION = 0.1  # of the E sequences
ESS_MIN_COUNT = 8.0


def ess_threshold(n_sequences: int) -> float:
    """The ESS below which a truth measurement is flagged unreliable: 10% of the N E sequences, but at
    least min(8, N/2) (so that a small E is not flagged at alpha = 0, where the ESS is N)."""
    return max(ESS_MIN_FRACTION * n_sequences, min(ESS_MIN_COUNT, 0.5 * n_sequences))


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _per_unit(batch: RolloutBatch, before: SequenceLogProbs, after: SequenceLogProbs) -> Tensor:
    """``(B, 4)`` float64 per unit: the change ``Delta_n`` (module docstring), the sums of the importance
    weights and of their squares (for the ESS), and G_n."""
    g = batch.unit_sizes.to(before.seq.device).double()
    gs = per_sequence(g, batch)  # (N,)
    weight = torch.exp(after.seq.double() - before.seq.double())  # (N,) importance weights
    h0, h1 = -before.weighted.double(), -after.weighted.double()  # (N,)
    baseline = (per_sequence(group_sum(h0, batch), batch) - h0) / (gs - 1)  # (N,) b_i, G >= 2
    change = group_sum(weight * (h1 - baseline) - (h0 - baseline), batch) / g
    w_sum, w2_sum = group_sum(weight, batch), group_sum(weight * weight, batch)
    return torch.stack([change, w_sum, w2_sum, g], dim=1)


def entropy_change(
    batch: RolloutBatch | None,
    before: SequenceLogProbs | None,
    after: SequenceLogProbs | None,
    predicted_per_unit: Tensor | None = None,
    lr: float = 0.0,
    comm=None,
) -> Change:
    """The entropy change on E from log-probs at theta (``before``) and theta' (``after``).

    ``predicted_per_unit``: the s_n; with ``lr`` it gives the SE of truth - prediction.
    ``comm``: under DDP the per-unit values of every rank are gathered (rank order), so the mean,
    the SEs and the ESS are global; ``batch`` is None on a rank holding no E units.
    """
    units = _per_unit(batch, before, after) if batch is not None else torch.zeros((0, 4), dtype=torch.float64)
    if comm is not None:
        units = comm.gather(units)  # (B_E, 4) over all ranks
    change, w_sum, w2_sum, sizes = units.unbind(dim=1)
    if not float(w_sum.sum()) > 0:
        raise ValueError(
            "truth: every importance weight underflows to 0; the step is far too large to measure"
        )
    delta = float(change.mean())
    ess = float(w_sum.sum() ** 2 / w2_sum.sum())
    reliable = ess >= ess_threshold(int(sizes.sum()))
    se = _finite_or_inf(jackknife_se(change, 1.0))
    se_diff = 0.0
    if predicted_per_unit is not None:
        diff = change - lr * predicted_per_unit.double().to(change.device)  # (B,) per-unit truth - prediction
        se_diff = _finite_or_inf(jackknife_se(diff, 1.0))
    return Change(delta, se, ess, se_diff, reliable)


def measure_truth(
    call: ProbeCall,
    v: Vector,
    batch: RolloutBatch | None,
    per_unit: Tensor,
    per_unit_q: Tensor | None = None,
) -> TruthResult:
    """The truth at each ``cfg.truth_alphas``; the headline numbers are those at alpha = 1 when swept,
    else at the last alpha.

    The log-probs at theta are re-evaluated through the same microbatched forward as those at theta',
    so that at alpha = 0 the weights are exactly 1. Under DDP (``call.comm``) ``per_unit`` holds every
    rank's s_n and ``batch`` is this rank's share of E (None if it holds none). With ``per_unit_q`` (the
    q_n of the second order, same order) the headline also gets ``se_diff_forecast``, the jackknife SE
    of truth - forecast, the forecast at alpha being ``alpha eta s_n + (alpha eta)^2/2 q_n`` per unit.
    """
    module, params, cfg, comm, lr = call.module, call.params, call.config, call.comm, call.lr
    alphas, passes = cfg.truth_alphas, call.passes
    base = None
    if batch is not None and not passes.steps_in_place:  # FSDP2: the step is taken in place on the shards
        base = full_precision_state(module, params)
    # A caller's autocast would round theta' back to bf16 inside every matmul: off for the truth.
    no_autocast = torch.autocast(device_of(params).type, enabled=False)
    before = None
    if batch is not None:
        with no_autocast:
            before = passes.logprobs_stepped(module, params, batch, cfg, v, 0.0, base)
    head_at = list(alphas).index(1.0) if 1.0 in alphas else len(alphas) - 1
    changes, after_head = [], None
    for i, alpha in enumerate(alphas):
        after = None
        if batch is not None:  # a rank holding no E units contributes nothing to the gathered sums
            where = f"truth at alpha={alpha!r}"
            with no_autocast, step_too_large(where, f"theta + alpha * lr * v with lr {lr:g}"):
                after = passes.logprobs_stepped(module, params, batch, cfg, v, alpha * lr, base)
            _check_weights(before.seq, after.seq, where)
        if i == head_at:
            after_head = after
        # The prediction at alpha is alpha * delta_h1; its per-unit pieces scale the same way.
        changes.append(entropy_change(batch, before, after, per_unit * alpha, lr, comm=comm))
    se_diff_forecast = None
    if per_unit_q is not None:  # no forward needed: the same log-probs, another per-unit prediction
        c = alphas[head_at]
        combined = c * per_unit.double() + 0.5 * c * c * lr * per_unit_q.double().to(per_unit.device)
        se_diff_forecast = entropy_change(batch, before, after_head, combined, lr, comm=comm).se_diff
    return truth_result(alphas, changes, head_at, se_diff_forecast)


def truth_result(
    alphas, changes: list[Change], head_at: int, se_diff_forecast: float | None = None
) -> TruthResult:
    """The ``TruthResult`` of a sweep: the headline at ``alphas[head_at]``, the least-squares slope of the
    change through the origin, and a RuntimeWarning naming the alphas whose weights were degenerate."""
    deltas = [c.delta_h for c in changes]
    a = torch.tensor(alphas, dtype=torch.float64)
    d = torch.tensor(deltas, dtype=torch.float64)
    slope = float((a * d).sum() / (a * a).sum()) if float((a * a).sum()) > 0 else math.nan
    head = changes[head_at]
    bad = [(a, c.ess) for a, c in zip(alphas, changes) if not c.reliable]
    if bad:
        where = ", ".join(f"{a:g} (ESS {e:.3g})" for a, e in bad)
        warnings.warn(
            f"truth: degenerate importance weights at alpha {where}; with an ESS below 10% of the E "
            "sequences (or below min(8, N/2)) the measured change is unreliable (truth.reliable = False)",
            RuntimeWarning,
            stacklevel=4,
        )
    return TruthResult(
        delta_h=head.delta_h,
        se=head.se,
        ess=head.ess,
        se_diff=head.se_diff,
        alphas=list(alphas),
        delta_h_at=deltas,
        se_at=[c.se for c in changes],
        ess_at=[c.ess for c in changes],
        se_diff_at=[c.se_diff for c in changes],
        slope=slope,
        se_diff_forecast=se_diff_forecast,
        reliable=head.reliable,
    )


# exp(709.8) is the largest finite float64: beyond it a weight is inf and the change inf or NaN.
MAX_LOG_WEIGHT = 700.0


def _check_weights(seq0: Tensor, seq1: Tensor, where: str) -> None:
    """The importance weights must be finite: a step that raises a log-prob by > 700 nats is an error.
    ``where`` names the measurement ("truth at alpha=1.0", "measure_change") in the message."""
    log_ratio = seq1.double() - seq0.double()  # (N,)
    bad = (~torch.isfinite(log_ratio)) | (log_ratio > MAX_LOG_WEIGHT)
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{where}: the importance weight of eval sequence {row} is "
            f"exp({float(log_ratio[row]):.4g}), not representable; the step is far too large"
        )


@contextlib.contextmanager
def step_too_large(where: str, step: str):
    """Logits that are finite at theta but not after the step: the step, not the model, is at fault."""
    try:
        yield
    except NonFiniteLogits as e:
        raise ValueError(
            f"{where}: the step is too large ({step}): after it the {e}. The forecast itself was made "
            "at finite logits"
        ) from e
