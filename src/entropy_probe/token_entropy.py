"""The token-level entropy the trainers log, and the per-unit pieces of its derivative (Rao-Blackwellised).

TRL, verl, OpenRLHF and prime-rl log the mean over all response tokens of the full-vocabulary entropy
``H_t`` at the sampling temperature. Its population value is a ratio of expectations over prompts x and
responses y:

    H_tok = E_x E_y[A] / E_x E_y[L],   A = sum_t m_t H_t,   L = sum_t m_t

``H_t`` is a function of the prefix y_<t only (so is the mask m_t: a response ends at its EOS), hence the
derivative of the numerator along a direction splits into a pathwise and a causal score-function part:

    d E_y[A] = E_y[ sum_t m_t dH_t + sum_k m_k dl_k (R_k - b_k) ],   R_k = sum_{t > k} m_t H_t

(the score of token k multiplies only the entropies after k: reward-to-go). The denominator has only
the score part, with the length-to-go ``sum_{t > k} m_t``. ``b_k`` is a leave-one-out baseline: the mean
over the unit's other responses of their to-go value at the same response index k (independent of y_i, so
it adds no bias). Against the sampled-token form (``-l_t`` in place of ``H_t``, one score for the whole
sequence) this uses the exact ``H_t`` at every position and drops the scores that cannot correlate with
what follows them (docs/token_entropy.md has the measured variance reductions).

All of it is written as per-token coefficients of the differentiable ``H_t`` and ``l_t``, constant given
the batch, so that the backward engine (a backward of ``sum alpha H + beta l``) and the jvp engine
(``sum alpha dH + beta dl`` from forward-mode derivatives) share one definition:

    dN_n = sum_{i in n, t} alpha_it dH_it + beta_it dl_it       dD_n = sum_{i in n, t} gamma_it dl_it

Units are described by any object with ``unit_index`` ``(N,)``, ``unit_sizes`` ``(B,)`` and ``n_units``
(a ``RolloutBatch``, or ``Units`` for vectorised validation over many draws at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .objectives import group_sum, per_sequence

TOKEN_ESTIMATORS = ("rao-blackwell", "sampled")


class Units(NamedTuple):
    """The unit structure of N rows: ``unit_index[i]`` in 0..B-1, ``unit_sizes`` the G of each unit."""

    unit_index: Tensor
    unit_sizes: Tensor
    n_units: int

    @staticmethod
    def regular(n_units: int, group_size: int, device=None) -> "Units":
        """B units of G consecutive rows each."""
        index = torch.arange(n_units, device=device).repeat_interleave(group_size)
        return Units(index, torch.full((n_units,), group_size, device=device), n_units)


@dataclass
class TokenCoefficients:
    """Per-token coefficients ``(N, T)`` (fp32 or float64, detached, 0 outside the response).

    entropy: alpha, multiplies H_t in the numerator's surrogate (the pathwise part);
    logprob_num: beta, multiplies l_t in the numerator's surrogate (the score part);
    logprob_den: gamma, multiplies l_t in the denominator's surrogate.
    """

    entropy: Tensor
    logprob_num: Tensor
    logprob_den: Tensor


def strictly_after(x: Tensor) -> Tensor:
    """``(N, T)``: entry k is ``sum_{t > k} x_t`` along the row (the to-go sum, k itself excluded)."""
    return x.flip(1).cumsum(1).flip(1) - x


def position_loo_baseline(to_go: Tensor, mask: Tensor, units) -> Tensor:
    """``(N, T)``: at response token k of row i, the mean over the unit's other rows j of their ``to_go`` at
    the same response index (0 where j's response is shorter: nothing is left to go there).

    Response indices, not columns: rows of one unit may be padded differently (left padding).
    """
    m = mask.bool()
    ridx = (m.long().cumsum(1) - 1).clamp_min(0)  # (N, T) response index of each response token
    width = int(ridx.max()) + 1
    aligned = torch.zeros(to_go.shape[0], width, dtype=to_go.dtype, device=to_go.device)  # (N, Lmax)
    aligned.scatter_add_(1, ridx, torch.where(m, to_go, 0.0))
    unit_sum = torch.zeros(units.n_units, width, dtype=to_go.dtype, device=to_go.device)  # (B, Lmax)
    unit_sum.index_add_(0, units.unit_index.to(to_go.device), aligned)
    g = per_sequence(units.unit_sizes.to(to_go.device).to(to_go.dtype), units)[:, None]  # (N, 1)
    loo = (unit_sum[units.unit_index.to(to_go.device)] - aligned) / (g - 1)  # (N, Lmax)
    return torch.where(m, loo.gather(1, ridx), 0.0)  # (N, T)


def token_coefficients(
    entropy: Tensor, logprob: Tensor, mask: Tensor, units, estimator: str = "rao-blackwell"
) -> TokenCoefficients:
    """The coefficients of the unit surrogates of dN_n and dD_n (module docstring), each divided by G.

    ``entropy`` H_t and ``logprob`` l_t ``(N, T)`` (detached here), ``mask`` m_t.
    estimator "rao-blackwell": exact H_t with its pathwise derivative, reward-to-go scores, baseline per
    response index. "sampled": the probe's sequence-level estimator applied to the same functional, for
    comparison: ``-l_t`` in place of H_t (``E[A] = E[-S]``), one score for the whole sequence, the
    sequence-level leave-one-out baseline.
    """
    m = mask.to(entropy.dtype)
    h, lp = entropy.detach() * m, logprob.detach() * m
    g = per_sequence(units.unit_sizes.to(h.device).to(h.dtype), units)[:, None]  # (N, 1)
    if estimator == "rao-blackwell":
        num_go, den_go = strictly_after(h), strictly_after(m)
        beta = (num_go - position_loo_baseline(num_go, m, units)) * m / g
        gamma = (den_go - position_loo_baseline(den_go, m, units)) * m / g
        return TokenCoefficients(m / g, beta, gamma)
    if estimator == "sampled":
        neg_s, length = -lp.sum(1), m.sum(1)  # (N,) -S_i and L_i

        def loo(x):  # sequence-level leave-one-out mean of the unit's other rows
            return (per_sequence(group_sum(x, units), units) - x) / (g[:, 0] - 1)

        # d E[-S] = E[-(S - b) dS] + E[-dS]: the score with -(S - b), plus the pathwise -dS
        beta = ((neg_s - loo(neg_s))[:, None] - 1.0) * m / g
        gamma = (length - loo(length))[:, None] * m / g
        return TokenCoefficients(torch.zeros_like(m), beta, gamma)
    raise ValueError(f"token estimator must be one of {TOKEN_ESTIMATORS}, got {estimator!r}")


class UnitTotals(NamedTuple):
    """Per-unit ``(B,)`` N_n = mean_i A_i and D_n = mean_i L_i, and the pooled sums over rows (the trainers'
    formula is ``entropy_sum / token_count``)."""

    numerator: Tensor
    denominator: Tensor
    entropy_sum: Tensor
    token_count: Tensor


def unit_totals(entropy: Tensor, mask: Tensor, units) -> UnitTotals:
    """N_n, D_n ``(B,)`` and the pooled sums, float64 and detached."""
    m = mask.double()
    a, length = (entropy.detach().double() * m).sum(1), m.sum(1)  # (N,) A_i and L_i
    g = units.unit_sizes.to(a.device).double()
    return UnitTotals(group_sum(a, units) / g, group_sum(length, units) / g, a.sum(), length.sum())


def unit_derivatives(
    coeff: TokenCoefficients, d_entropy: Tensor, d_logprob: Tensor, units
) -> tuple[Tensor, Tensor]:
    """``(dN_n, dD_n)``, each ``(B,)`` float64, from forward-mode derivatives dH_t, dl_t ``(N, T)``."""
    dh, dl = d_entropy.double(), d_logprob.double()
    dn = (coeff.entropy.double() * dh + coeff.logprob_num.double() * dl).sum(1)  # (N,)
    dd = (coeff.logprob_den.double() * dl).sum(1)
    return group_sum(dn, units), group_sum(dd, units)


def numerator_surrogate(coeff: TokenCoefficients, entropy: Tensor, logprob: Tensor) -> Tensor:
    """Scalar whose gradient along v is ``sum_n dN_n`` over the rows given (the backward engine's)."""
    return (coeff.entropy * entropy + coeff.logprob_num * logprob).sum()


def denominator_surrogate(coeff: TokenCoefficients, logprob: Tensor) -> Tensor:
    """Scalar whose gradient along v is ``sum_n dD_n`` over the rows given."""
    return (coeff.logprob_den * logprob).sum()
