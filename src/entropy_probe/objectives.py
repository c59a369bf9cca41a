"""The two scalar objectives the probe differentiates, as per-sequence coefficients.

Every quantity the probe needs is linear in the per-sequence log-probs S_i and S_w,i with
coefficients that are constant (detached) given the batch:

- the policy-gradient surrogate of one U unit m (DESIGN section 4), ascent convention:
  ``J_m = sum_{i in m} c_i S_i``, so ``grad J_m`` is a backward of that sum and ``grad J_m . u``
  is ``sum_i c_i dS_i``;
- the entropy-gradient estimate of one E unit n (DESIGN section 3):
  ``X_n = grad( sum_{i in n} a_i S_i + e_i S_w,i )`` with
  ``a_i = -(S_w,i - b_i) / G``, ``b_i = mean_{j != i} S_w,j`` and ``e_i = -1/G`` (unbiased) or 0
  (``"seed"``: the founding note's ``L_X = -mean(detach(S_w - S_w^LOO) * S)``).

Writing them as coefficients lets the backward engine and the jvp engine share one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import RolloutBatch
from .config import ADVANTAGE_ESTIMATORS, LOSS_AGGREGATIONS, X_ESTIMATORS  # noqa: F401  (the config owns the lists)

# TRL 1.16 GRPOTrainer (scale_rewards="group"): A = (r - mean) / (std + 1e-4), std Bessel-corrected
# (trl.trainer.utils.nanstd). verl uses 1e-6; the probe follows TRL.
GRPO_STD_EPS = 1e-4


def group_sum(x: Tensor, batch: RolloutBatch) -> Tensor:
    """``(B,)`` per-unit sums of a per-sequence ``(N,)`` tensor."""
    return torch.zeros(batch.n_units, dtype=x.dtype, device=x.device).index_add_(
        0, batch.unit_index.to(x.device), x
    )


def per_sequence(x_unit: Tensor, batch: RolloutBatch) -> Tensor:
    """Broadcast a per-unit ``(B,)`` tensor back to ``(N,)`` sequences."""
    return x_unit[batch.unit_index.to(x_unit.device)]


def advantages(batch: RolloutBatch, estimator: str | None) -> Tensor:
    """``(N,)`` advantages. ``None`` means "given" when the batch has advantages, else "grpo"."""
    if batch.rewards is None and batch.advantages is None:
        raise ValueError(
            "update_batch: the RolloutBatch has neither rewards nor advantages; the policy "
            "gradient needs one of them"
        )
    if estimator is None:
        estimator = "given" if batch.advantages is not None else "grpo"
    if estimator == "given":
        if batch.advantages is None:
            raise ValueError(
                "advantage_estimator='given' needs RolloutBatch.advantages; the batch has only rewards"
            )
        return batch.advantages.float()
    if batch.rewards is None:
        raise ValueError(
            f"advantage_estimator={estimator!r} needs RolloutBatch.rewards; the batch has only "
            "advantages (use advantage_estimator='given')"
        )
    r = batch.rewards.double()
    g = per_sequence(batch.unit_sizes.to(r.device).double(), batch)
    mean = per_sequence(group_sum(r, batch), batch) / g
    centred = r - mean
    if estimator == "dr-grpo":
        a = centred
    elif estimator == "rloo":
        a = centred * g / (g - 1)  # r_i - mean_{j != i} r_j
    else:  # grpo: group z-score with the unbiased std
        std = (per_sequence(group_sum(centred**2, batch), batch) / (g - 1)).sqrt()
        a = centred / (std + GRPO_STD_EPS)
    return a.float()


@dataclass(frozen=True)
class UpdateTotals:
    """Batch-wide normalisers of the loss aggregation (global over ranks under DDP)."""

    n_units: int
    n_sequences: int
    n_tokens: int
    max_length: int

    @staticmethod
    def of(batch: RolloutBatch) -> "UpdateTotals":
        lengths = batch.response_lengths
        return UpdateTotals(batch.n_units, batch.n_sequences, int(lengths.sum()), int(lengths.max()))


def policy_gradient_coefficients(
    batch: RolloutBatch, adv: Tensor, aggregation: str, totals: UpdateTotals, norm_length: int | None = None
) -> Tensor:
    """``(N,)`` c_i with ``J_U = sum_i c_i S_i`` and ``J_m = B_U * sum_{i in m} c_i S_i``.

    Returned already multiplied by B_U so that ``J_m`` is a plain sum over the unit's sequences and
    ``J_U = mean_m J_m``.
    aggregation: "seq-mean-token-mean" (GRPO), "seq-mean-token-sum", "token-mean" (DAPO: one mean
    over every response token of the batch), "seq-mean-token-sum-norm" (Dr. GRPO: token sums over a
    constant length ``norm_length``, required: TRL's ``loss_type="dr_grpo"`` divides by
    ``N * max_completion_length``, a constant of the run, not the longest response of this batch).
    """
    lengths = batch.response_lengths.to(adv.device).float()
    if aggregation == "seq-mean-token-mean":
        c = adv / (lengths * totals.n_sequences)
    elif aggregation == "seq-mean-token-sum":
        c = adv / totals.n_sequences
    elif aggregation == "token-mean":
        c = adv / totals.n_tokens
    elif aggregation == "seq-mean-token-sum-norm":
        if norm_length is None:
            raise ValueError(
                "loss_aggregation='seq-mean-token-sum-norm' needs ProbeConfig.norm_length: "
                "the run's constant length (TRL: GRPOConfig.max_completion_length)"
            )
        c = adv / (totals.n_sequences * float(norm_length))
    else:
        raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {aggregation!r}")
    return c * totals.n_units


def entropy_gradient_coefficients(
    weighted: Tensor, batch: RolloutBatch, estimator: str
) -> tuple[Tensor, Tensor]:
    """``(a, e)``, each ``(N,)``: the E-unit surrogate is ``sum_{i in n} a_i S_i + e_i S_w,i``.

    ``weighted`` holds S_w,i; it is detached here (the score-function coefficient is a constant).
    """
    sw = weighted.detach()
    g = per_sequence(batch.unit_sizes.to(sw.device).to(sw.dtype), batch)
    loo_baseline = (per_sequence(group_sum(sw, batch), batch) - sw) / (g - 1)  # b_i = mean_{j != i} S_w,j
    a = -(sw - loo_baseline) / g
    e = -1.0 / g if estimator == "unbiased" else torch.zeros_like(g)
    return a, e


def unit_entropy(weighted: Tensor, batch: RolloutBatch) -> Tensor:
    """``(B,)`` per-unit entropy estimates ``-(1/G) sum_i S_w,i`` (nats)."""
    sw = weighted.detach()
    return -group_sum(sw, batch) / batch.unit_sizes.to(sw.device).to(sw.dtype)


def entropy_surrogate(lp, batch: RolloutBatch, x_estimator: str, tangent: bool = False) -> Tensor:
    """The E surrogate, the one place it is written: the scalar whose gradient is ``sum_n X_n`` over
    ``batch``'s units, ``sum_i a_i S_i + e_i S_w,i`` with (a, e) constant given the batch
    (``entropy_gradient_coefficients``). ``tangent=True`` (``lp`` a ``DirectionalLogProbs``): instead the
    ``(B,)`` per-unit derivatives along v, ``s_n = sum_{i in n} a_i dS_i + e_i dS_w,i`` (the jvp engine).
    """
    a, e = entropy_gradient_coefficients(lp.weighted, batch, x_estimator)
    if tangent:
        return group_sum(a * lp.d_seq + e * lp.d_weighted, batch)  # (B,)
    return (a * lp.seq + e * lp.weighted).sum()


def update_surrogate(seq: Tensor, coeff: Tensor) -> Tensor:
    """The U surrogate, the one place it is written: ``J = sum_i c_i S_i`` (``coeff``: ``(N,)`` c_i of the
    same rows as ``seq``), whose gradient is the policy gradient of the run's loss on those rows."""
    return (coeff * seq).sum()
