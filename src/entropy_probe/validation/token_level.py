"""Many independent E batches at once for the token-level estimator: unbiasedness, calibration and the
variance against the sampled-token estimator (docs/token_entropy.md).

Units are independent, so K draws of B_E units are one set of K * B_E units: the per-token terms of
every row are computed once (one forward-mode pass along v), the draws index into them, and the
per-unit pieces and ratio statistics of all draws are computed in a few vectorised calls.

- ``enumerated_rows``: the toy policy's every response, with its probability: draws are exact samples;
- ``sampled_rows``: independently sampled rows of any model (each draw uses its own rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..batch import RolloutBatch
from ..engines.jvp import forward_mode_ready
from ..engines.token import DirectionalTokenTerms, directional_token_terms
from ..ratio_statistics import ratio_jackknife, ratio_plug_in, ratio_unit_values
from ..token_entropy import Units, token_coefficients, unit_derivatives, unit_totals
from ..toy import TabularPolicy, enumerate_responses, exact_token_derivative
from ..vectors import Vector


@dataclass
class RowTerms:
    """Per-token terms of R rows ``(R, K)`` and, for enumerated rows, their probabilities by prompt."""

    d: DirectionalTokenTerms
    prob: Tensor | None = None  # (P, R / P): pi(y | x), rows of prompt p at p * R/P ...


def parameters_of(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def enumerated_rows(policy: TabularPolicy, v: Vector, temperature: float = 1.0) -> RowTerms:
    """Every response of every prompt of the toy policy, with dH_t, dl_t along v and pi(y | x)."""
    resp = enumerate_responses(policy)
    batch = resp.batch()
    with forward_mode_ready(policy):
        d = directional_token_terms(policy, parameters_of(policy), batch, v, temperature)
    seq = d.terms.logprob.double().sum(1)  # (R,) log pi(y | x)
    return RowTerms(d, torch.exp(seq).reshape(len(policy.prompts), -1))


def sampled_rows(
    model: nn.Module, batch: RolloutBatch, v: Vector, temperature: float, units_per_pass: int = 64
):
    """The rows of a sampled batch (units of consecutive rows, as ``sampling.sample_rollouts`` makes them),
    with dH_t, dl_t along v, in batch row order."""
    parts, rows = [], []
    with forward_mode_ready(model):
        for mb in batch.microbatches(units_per_pass):
            parts.append(directional_token_terms(model, parameters_of(model), mb.batch, v, temperature))
            rows.append(mb.rows)
    width = max(p.terms.mask.shape[1] for p in parts)
    order = torch.argsort(torch.cat(rows))

    def cat(get):  # right-align the passes' last-K columns, then back to batch row order
        return torch.cat([torch.nn.functional.pad(get(p), (width - get(p).shape[1], 0)) for p in parts])[
            order
        ]

    terms = type(parts[0].terms)(
        *(cat(lambda p, i=i: getattr(p.terms, f)) for i, f in enumerate(("entropy", "logprob", "mask")))
    )
    return RowTerms(DirectionalTokenTerms(terms, cat(lambda p: p.d_entropy), cat(lambda p: p.d_logprob)))


def draw_enumerated(prob: Tensor, n_draws: int, n_units: int, group_size: int, seed: int) -> Tensor:
    """``(n_draws * n_units * group_size,)`` row indices: prompts uniform, responses from pi(y | x)."""
    gen = torch.Generator().manual_seed(seed)
    n_prompts, per_prompt = prob.shape
    prompts = torch.randint(n_prompts, (n_draws * n_units,), generator=gen)
    draws = torch.multinomial(prob[prompts].float(), group_size, replacement=True, generator=gen)  # (K*B, G)
    return (prompts[:, None] * per_prompt + draws).reshape(-1)


@dataclass
class DrawEstimates:
    """Per draw ``(K,)`` float64, and the per-unit values ``(K, B)``."""

    jackknife: Tensor  # the corrected dH (mean of s_n)
    plug_in: Tensor
    se: Tensor  # sqrt(var(s_n) / B)
    s: Tensor  # (K, B)
    entropy: Tensor  # Nbar / Dbar of each draw
    numerator: Tensor  # mean_n dN_n: the sequence-level "sum" functional's estimate (no ratio)


def draw_estimates(
    rows: RowTerms, index: Tensor, n_units: int, group_size: int, estimator: str = "rao-blackwell"
) -> DrawEstimates:
    """The token-level estimates of K = len(index) / (B G) independent draws, vectorised."""
    d = rows.d
    t = d.terms
    pick = lambda x: x[index]  # noqa: E731  (K*B*G, K_cols)
    units = Units.regular(index.numel() // group_size, group_size)
    coeff = token_coefficients(pick(t.entropy), pick(t.logprob), pick(t.mask), units, estimator)
    dn, dd = unit_derivatives(coeff, pick(d.d_entropy), pick(d.d_logprob), units)
    tot = unit_totals(pick(t.entropy), pick(t.mask), units)
    shape = (-1, n_units)  # (K, B)
    dn, dd, n, den = (
        dn.reshape(shape),
        dd.reshape(shape),
        tot.numerator.reshape(shape),
        tot.denominator.reshape(shape),
    )
    s = ratio_unit_values(dn, dd, n, den)
    return DrawEstimates(
        jackknife=ratio_jackknife(dn, dd, n, den),
        plug_in=ratio_plug_in(dn, dd, n, den),
        se=(s.var(dim=1) / n_units).sqrt(),
        s=s,
        entropy=n.sum(1) / den.sum(1),
        numerator=dn.mean(1),
    )


# ---- the checks of ``entropy-probe validate`` for the token-level entropy ---------------------------
TOKEN_DRAWS = 1000  # independent E batches per B_E
TOKEN_UNITS = (8, 16, 32)  # B_E of the calibration checks
TOKEN_TESTS = 2 + 2 * len(TOKEN_UNITS)  # statistical tests among token_checks (k's family)


def token_checks(policy: TabularPolicy, v: Vector, seed: int, k: float, draws: int = TOKEN_DRAWS) -> list:
    """Unbiasedness and ratio bias at B_E = 8, variance ratio and coverage at B_E = 8, 16, 32, and the
    variance against the sampled-token estimator at B_E = 8, over ``draws`` independent exact draws each."""
    from .checks import coverage_check, unbiased_check, variance_check
    from .problem import Check
    from .stats import excess_kurtosis, skewness

    exact = exact_token_derivative(policy, v)
    rows = enumerated_rows(policy, v)
    checks = []
    for b in TOKEN_UNITS:
        index = draw_enumerated(rows.prob, draws, b, 4, seed=1_000_003 * seed + b)
        est = draw_estimates(rows, index, b, 4)
        units = (est.s - est.s.mean(1, keepdim=True)).reshape(-1).tolist()
        kurt, skew = excess_kurtosis(units), skewness(units)
        delta, se = est.jackknife.tolist(), est.se.tolist()
        if b == TOKEN_UNITS[0]:
            checks.append(unbiased_check(f"token: unbiased vs exact (B_E={b})", delta, exact, k))
            checks.append(_ratio_bias_check(est, exact, k, b, Check))
            sampled = draw_estimates(rows, index, b, 4, "sampled")
            factor = float(sampled.jackknife.var() / est.jackknife.var())
            checks.append(
                Check(
                    f"token: variance vs sampled-token (B_E={b})",
                    factor >= 2.0,
                    f"{factor:.2f}x lower",
                    ">= 2x",
                    dict(factor=factor, draws=draws),
                )
            )
        var = (est.se**2).tolist()
        checks.append(variance_check(f"token: variance ratio (B_E={b})", delta, var, kurt, b, k))
        checks.append(coverage_check(f"token: coverage (B_E={b})", delta, se, exact, b, skew, kurt, k))
    return checks


def _ratio_bias_check(est: DrawEstimates, exact: float, k: float, b: int, check_cls):
    """|mean - exact| + k SE(mean) below 0.2 of one estimate's SD: the ratio's bias is small, not just
    undetected; the plug-in's is reported next to it."""
    n = est.jackknife.numel()
    sd = float(est.jackknife.std())
    bias, plug_bias = float(est.jackknife.mean()) - exact, float(est.plug_in.mean()) - exact
    bound = (abs(bias) + k * sd / n**0.5) / sd
    return check_cls(
        f"token: ratio bias below 0.2 SE (B_E={b})",
        bound < 0.2,
        f"|bias| + {k:.2f} SE = {bound:.3f} SD (plug-in bias {plug_bias / sd:+.3f} SD)",
        "< 0.2 SD",
        dict(bias=bias, plug_in_bias=plug_bias, sd=sd, bound_in_sd=bound, draws=n),
    )
