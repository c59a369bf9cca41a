"""The truth and the measured change of the token-level entropy (docs/design.md sections 10 and 16).

E was sampled at theta; ``token_functional`` estimates the token-level entropy at theta' from the
per-token log-probs and entropies at theta and theta' (prefix importance weights, leave-one-out
control variates, the jackknifed ratio). Per unit the change is ``u_n(theta') - u_n(theta)``, the
difference of the ratio's per-unit values (jackknifed ratio plus the delta method's influence of unit
n, as the forecast forms its s_n), and the headline ``mean_n`` of it: at alpha = 0 exactly 0, and its
derivatives in alpha at 0 are the forecast's ``s_n`` and ``q_n`` (``unit_value_derivatives``), so
truth - forecast on the same E is the Taylor remainder. SEs are ``std / sqrt(B)`` of the per-unit
values (the delta method's), also for truth - prediction.

These functions take the per-token quantities (``ResponseTokens``), so they serve one process, DDP and
FSDP2 alike: under several ranks the per-unit rows are gathered (rank order) before the ratio, which
needs every unit, so every rank computes the same bits. The ESS is that of the whole-response weights,
with the sequence functional's threshold (``truth.ess_threshold``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .batch import RolloutBatch
from .context import ProbeCall
from .response_tokens import ResponseTokens
from .result import TruthResult
from .statistics import jackknife_se
from .token_functional import baselines, functional_unit_values, sequence_weights, unit_estimates
from .truth import Change, _check_weights, ess_threshold, full_precision_state, step_too_large, truth_result
from .vectors import Vector, device_of


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def unit_rows(batch: RolloutBatch, before: ResponseTokens, after: ResponseTokens) -> Tensor:
    """``(B, 7)`` float64 per unit: ``(N_n, D_n)`` at theta', at theta, the sums of the whole-response
    weights and of their squares (ESS), and G_n. What a rank contributes to the gathered truth."""
    base = baselines(before, batch)
    zero = torch.zeros_like(before.logp)
    moved = unit_estimates(batch, before, after.logp.double() - before.logp.double(), after.entropy, base)
    still = unit_estimates(batch, before, zero, before.entropy, base)
    w = sequence_weights(before, after.logp)  # (N,)
    g = batch.unit_sizes.to(w.device).double()
    idx = batch.unit_index.to(w.device)
    w_sum = torch.zeros_like(g).index_add(0, idx, w)
    w2_sum = torch.zeros_like(g).index_add(0, idx, w * w)
    return torch.cat([moved, still, torch.stack([w_sum, w2_sum, g], dim=1)], dim=1)


def token_change(
    batch: RolloutBatch | None,
    before: ResponseTokens | None,
    after: ResponseTokens | None,
    predicted_per_unit: Tensor | None = None,
    lr: float = 0.0,
    comm=None,
    ratio: bool = True,
    device: torch.device | None = None,
) -> Change:
    """The token-level entropy change on E between the terms ``before`` (theta) and ``after`` (theta').

    ``predicted_per_unit``: every unit's predicted derivative (``(B_E,)``, rank order) in nats per unit
    of ``lr``; with it ``se_diff`` is the SE of truth - prediction. ``batch`` None: a rank holding no E
    unit (``comm`` gathers the others'). ``ratio`` False: the numerator alone (``entropy="sequence"`` with
    "sum" weighting, ``token_functional.functional_unit_values``). ``device``: where a rank holding no unit
    makes its empty rows (the model's).
    """
    if batch is not None:
        rows = unit_rows(batch, before, after)
    else:
        rows = torch.zeros((0, 7), dtype=torch.float64, device=device)
    if comm is not None:
        rows = comm.gather(rows)  # (B_E, 7) over all ranks, rank order
    if rows.shape[0] == 0:
        raise ValueError("eval_batch: no rank holds any eval unit")
    w_sum, w2_sum, sizes = rows[:, 4], rows[:, 5], rows[:, 6]
    if not float(w_sum.sum()) > 0:
        raise ValueError(
            "truth: every importance weight underflows to 0; the step is far too large to measure"
        )
    change = functional_unit_values(rows[:, 0:2], ratio) - functional_unit_values(
        rows[:, 2:4], ratio
    )  # (B_E,)
    ess = float(w_sum.sum() ** 2 / w2_sum.sum())
    se = _finite_or_inf(jackknife_se(change, 1.0))
    se_diff = 0.0
    if predicted_per_unit is not None:
        diff = change - lr * predicted_per_unit.double().to(change.device)
        se_diff = _finite_or_inf(jackknife_se(diff, 1.0))
    reliable = ess >= ess_threshold(int(sizes.sum()))
    return Change(float(change.mean()), se, ess, se_diff, reliable)


def measure_token_truth(
    call: ProbeCall,
    v: Vector,
    batch: RolloutBatch | None,
    per_unit: Tensor,
    per_unit_q: Tensor | None = None,
) -> TruthResult:
    """``truth.measure_truth`` for the token-level entropy: the same sweep over ``cfg.truth_alphas``, the
    same headline (alpha = 1 when swept, else the last), the same fields; the change is ``token_change``.

    ``per_unit``: every rank's s_n (rank order); ``per_unit_q`` the q_n (second order), for
    ``se_diff_forecast``. The tokens at theta and theta' come from the call's passes
    (``passes.Passes.tokens_stepped``: functionally, or on FSDP2 shards moved in place), the ones at theta
    through the same forward as those at theta', so that at alpha = 0 every weight is exactly 1.
    ``cfg.entropy`` "sequence" (with "sum" weighting, the only sequence functional measured here): the
    numerator alone.
    """
    module, params, cfg, comm, lr = call.module, call.params, call.config, call.comm, call.lr
    alphas, passes = cfg.truth_alphas, call.passes
    ratio = cfg.entropy == "token"
    base = None
    if batch is not None and not passes.steps_in_place:  # a bf16 model's theta' formed in fp32
        base = full_precision_state(module, params)
    no_autocast = torch.autocast(device_of(params).type, enabled=False)  # theta' is not rounded to bf16
    before, afters = None, []
    with no_autocast:
        if batch is not None:  # (under FSDP2 every rank holds E: ShardedPasses.check_call)
            before = passes.tokens_stepped(module, params, batch, cfg, v, 0.0, base)
        for alpha in alphas:
            after = None
            if batch is not None:
                where = f"truth at alpha={alpha!r}"
                with step_too_large(where, f"theta + alpha * lr * v with lr {lr:g}"):
                    after = passes.tokens_stepped(module, params, batch, cfg, v, alpha * lr, base)
                _check_weights(before.seq, after.seq, where)
            afters.append(after)
    head_at = list(alphas).index(1.0) if 1.0 in alphas else len(alphas) - 1
    changes = [
        token_change(batch, before, after, per_unit * a, lr, comm, ratio, device_of(params))
        for a, after in zip(alphas, afters)
    ]
    se_diff_forecast = None
    if per_unit_q is not None:  # the same tokens, another per-unit prediction
        c = alphas[head_at]
        combined = c * per_unit.double() + 0.5 * c * c * lr * per_unit_q.double().to(per_unit.device)
        head = afters[head_at]
        se_diff_forecast = token_change(
            batch, before, head, combined, lr, comm, ratio, device_of(params)
        ).se_diff
    return truth_result(alphas, changes, head_at, se_diff_forecast)
