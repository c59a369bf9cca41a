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
from ..toy import TabularPolicy, enumerate_responses
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
    )
