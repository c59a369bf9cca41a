"""The token-level entropy on E at a moved policy, as a function of per-token quantities
(docs/design.md section 16).

``H_tok = E_x E_y[sum_k m_k H_k] / E_x E_y[sum_k m_k]``, a ratio of two expectations. Both summands
are functions of the prefix only (``m_k``, whether token k exists, and ``H_k``, the entropy of the
distribution that draws it, are fixed by ``y_<k``), so at theta' each term needs only the importance
weight of its prefix, ``W_<k = exp(sum_{j<k} r_j)`` with ``r_j = l_j(theta') - l_j(theta)``. Per
response i of unit n (G_n responses, all drawn at theta):

    N_i(theta') = sum_k m_k [ W_<k H_k' - (W_<=k - W_<k) bH_ik ]
    D_i(theta') = sum_k m_k [ W_<k      - (W_<=k - W_<k) bL_ik ]

The second terms are control variates with mean 0 (``E[W_<=k | y_<k] = W_<k``), with baselines that do
not depend on response i: ``bH_ik`` the mean over the unit's other responses of their entropy-to-go
``sum_{t>k} m_t H_t`` at theta, ``bL_ik`` the same of their length-to-go. ``N_n, D_n`` are the unit
means (unbiased for the prompt's two expectations at theta'), and the functional's estimate is the
ratio of their means over units with the delete-one-unit jackknife bias correction, written as per-unit
values ``u_n = R_J + (delta-method influence of unit n)`` (``ratio_level_unit_values``): ``mean_n u_n`` is
the corrected ratio and ``std(u) / sqrt(B)`` its delta-method SE.

In alpha (``theta' = theta + alpha eta v``) the first derivative of ``N_i`` at 0 is the
Rao-Blackwellised estimator of the numerator's derivative: each token's score ``dl_k`` times the
entropy-to-go after it minus its baseline, plus the pathwise ``sum_k m_k dH_k``; likewise for ``D_i``
(score times length-to-go minus its baseline). So the per-unit values ``u_n(alpha) - u_n(0)`` (the
truth) have as derivatives at 0 the forecast's s_n and q_n (``unit_taylor``, ``unit_value_derivatives``),
unit by unit, and truth - forecast on the same E is the Taylor remainder.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import RolloutBatch
from .response_tokens import ResponseTokens


def _unit_sum(x: Tensor, batch: RolloutBatch) -> Tensor:
    """``(B, ...)`` per-unit sums of a per-row ``(N, ...)`` tensor."""
    out = torch.zeros((batch.n_units, *x.shape[1:]), dtype=x.dtype, device=x.device)
    return out.index_add(0, batch.unit_index.to(x.device), x)


def _unit_sizes(batch: RolloutBatch, like: Tensor) -> Tensor:
    return batch.unit_sizes.to(device=like.device, dtype=like.dtype)  # (B,)


def to_go(x: Tensor) -> Tensor:
    """``(N, L)``: entry k is ``sum_{t > k} x_t`` (what follows token k)."""
    total = x.sum(dim=1, keepdim=True)
    return total - x.cumsum(dim=1)


def baselines(before: ResponseTokens, batch: RolloutBatch) -> tuple[Tensor, Tensor]:
    """``(bH, bL)``, each ``(N, L)`` float64: the leave-one-out means, over the unit's other responses, of
    the entropy-to-go and the length-to-go after position k (at theta; they do not depend on response i)."""
    m = before.mask.double()
    per_row = torch.stack([to_go(m * before.entropy.double()), to_go(m)])  # (2, N, L)
    g = _unit_sizes(batch, per_row)[batch.unit_index.to(per_row.device)]  # (N,) G of each row's unit
    rows_total = _unit_sum(per_row.transpose(0, 1), batch)[batch.unit_index.to(per_row.device)]  # (N, 2, L)
    loo = (rows_total.transpose(0, 1) - per_row) / (g - 1).reshape(1, -1, 1)  # (2, N, L), G >= 2
    return loo[0], loo[1]


def unit_estimates(
    batch: RolloutBatch,
    before: ResponseTokens,
    log_ratio: Tensor,
    entropy_after: Tensor,
    base: tuple[Tensor, Tensor],
) -> Tensor:
    """``(B, 2)`` float64 ``(N_n, D_n)`` at the moved policy (module docstring).

    ``log_ratio``: ``(N, L)`` ``l_k(theta') - l_k(theta)``; ``entropy_after``: ``(N, L)`` ``H_k(theta')``;
    ``base``: ``baselines(before, batch)``. At ``log_ratio = 0`` and unchanged entropies this is the
    unit means of ``sum_k m_k H_k`` and of the lengths. Differentiable (forward mode) in both tensors.
    """
    m = before.mask
    zero = torch.zeros((), dtype=torch.float64, device=m.device)
    r = torch.where(m, log_ratio.double(), zero)  # (N, L)
    through = r.cumsum(dim=1)  # sum_{j <= k} r_j
    w_before, w_through = torch.exp(through - r), torch.exp(through)  # W_<k, W_<=k
    control = w_through - w_before  # mean 0 given y_<k
    bh, bl = base
    num = torch.where(m, w_before * entropy_after.double() - control * bh, zero).sum(dim=1)  # (N,)
    den = torch.where(m, w_before - control * bl, zero).sum(dim=1)  # (N,)
    return _unit_sum(torch.stack([num, den], dim=1), batch) / _unit_sizes(batch, num).unsqueeze(1)


def ratio_level_unit_values(units: Tensor) -> Tensor:
    """``(B,)`` per-unit values of the ratio ``R = Nbar / Dbar`` itself (its level, not its derivative):
    ``u_n = R_J + (N_n - R D_n) / Dbar``.

    ``units``: ``(B, 2)`` ``(N_n, D_n)``. ``R_J = B R - (B - 1) mean_n R_(-n)`` is the delete-one-unit
    jackknife's bias-corrected ratio and the second term the delta method's influence of unit n (its mean
    is 0), so ``mean_n u_n = R_J`` and ``var(u) / B`` is the delta-method variance. Their derivatives in t
    are the forecast's per-unit values: the first is ``ratio_statistics.ratio_unit_values`` (the s_n, from
    the derivatives dN_n, dD_n). One unit: the plain ratio.
    """
    b = units.shape[0]
    total = units.sum(dim=0)  # (2,)
    ratio = total[0] / total[1]
    if b < 2:
        return ratio.expand(b)
    rest = total.unsqueeze(0) - units  # (B, 2) sums without unit n
    corrected = b * ratio - (b - 1) * (rest[:, 0] / rest[:, 1]).mean()
    return corrected + (units[:, 0] - ratio * units[:, 1]) / (total[1] / b)


def functional_unit_values(units: Tensor, ratio: bool) -> Tensor:
    """``(B,)`` per-unit values of the functional: the token-level ratio (``ratio_level_unit_values``), or,
    for ``entropy="sequence"`` with "sum" weighting (``E_x E_y[sum_t m_t H_t] = E_x E_y[-S]``), the
    numerator ``N_n`` alone."""
    return ratio_level_unit_values(units) if ratio else units[:, 0]


def sequence_weights(before: ResponseTokens, after_logp: Tensor) -> Tensor:
    """``(N,)`` float64 whole-response importance weights ``exp(S_i(theta') - S_i(theta))``, for the ESS."""
    r = torch.where(before.mask, after_logp.double() - before.logp.double(), 0.0)
    return torch.exp(r.sum(dim=1))


def _second_jvp(fn, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(fn(0), fn'(0), fn''(0))`` of a function of one scalar, by nested forward mode."""
    zero = torch.zeros((), dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)

    def first(a):
        return torch.func.jvp(fn, (a,), (one,))

    (value, d1), (_, d2) = torch.func.jvp(first, (zero,), (one,))
    return value, d1, d2


def unit_taylor(
    batch: RolloutBatch,
    before: ResponseTokens,
    d_logp: Tensor,
    d2_logp: Tensor,
    d_entropy: Tensor,
    d2_entropy: Tensor,
) -> Tensor:
    """``(B, 3, 2)`` float64: ``(N_n, D_n)`` and their first and second derivatives in t along
    ``theta + t v`` at 0, from the per-token derivatives along v (each ``(N, L)``).

    A second-order Taylor path of the per-token inputs has the same first two derivatives as the true
    one, so this is exactly the derivative of ``unit_estimates`` along the step, by the same code.
    """
    base = baselines(before, batch)
    dl, d2l, dh, d2h = (x.double() for x in (d_logp, d2_logp, d_entropy, d2_entropy))
    h0 = before.entropy.double()

    def along(a):
        return unit_estimates(
            batch, before, a * dl + 0.5 * a * a * d2l, h0 + a * dh + 0.5 * a * a * d2h, base
        )

    with torch.no_grad():
        return torch.stack(_second_jvp(along, torch.float64, h0.device), dim=1)


def unit_value_derivatives(taylor: Tensor, ratio: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(u_n, s_n, q_n)``, each ``(B,)``: the functional's per-unit values (``functional_unit_values``) and
    their first and second derivatives in t, from every unit's ``unit_taylor`` (``(B, 3, 2)``, all ranks,
    rank order)."""
    z, dz, d2z = taylor.double().unbind(dim=1)

    def along(a):
        return functional_unit_values(z + a * dz + 0.5 * a * a * d2z, ratio)

    with torch.no_grad():
        return _second_jvp(along, torch.float64, z.device)
