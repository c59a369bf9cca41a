"""The token-level entropy's per-unit pieces (``token_entropy``) from the model, by either engine.

- ``directional_token_terms``: H_t, l_t and their derivatives dH_t, dl_t along one direction for every
  response token of a batch, one forward-mode pass (``jvp.along``; the caller wraps it in
  ``jvp.forward_mode_ready``);
- ``token_unit_pieces``: from those, the per-unit N_n, D_n, dN_n, dD_n (the jvp engine's route);
- (the backward engine builds the same unit surrogates, ``token_entropy.numerator_surrogate`` and
  ``denominator_surrogate``, and projects their gradients on v).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..batch import RolloutBatch
from ..logprobs import TokenTerms, token_terms
from ..response_tokens import ResponseTokens
from ..token_entropy import (
    denominator_surrogate,
    numerator_surrogate,
    token_coefficients,
    unit_derivatives,
    unit_totals,
)
from ..vectors import Params, Vector
from .backward import projected_backward
from .jvp import along, forward_mode_ready


class DirectionalTokenTerms(NamedTuple):
    """``terms`` at theta (detached) and dH_t, dl_t ``(N, K)`` fp32 along the direction."""

    terms: TokenTerms
    d_entropy: Tensor
    d_logprob: Tensor


class TokenUnitPieces(NamedTuple):
    """Per unit ``(B,)`` float64 (dN, dD: ``(B, n_groups)`` with groups) and the pooled sums of the rows."""

    numerator: Tensor
    denominator: Tensor
    d_numerator: Tensor
    d_denominator: Tensor
    entropy_sum: Tensor
    token_count: Tensor


def directional_token_terms(
    module: nn.Module, params: Params, batch: RolloutBatch, direction: Vector, temperature: float
) -> DirectionalTokenTerms:
    """One forward-mode pass: H_t, l_t and their derivatives along ``direction`` (keyed like ``params``)."""

    def entropy_and_logprob(theta):
        t = token_terms(module, batch, temperature, params=theta)
        return t.entropy, t.logprob

    (h, lp), (dh, dl) = along(entropy_and_logprob, params, direction)
    mask = batch.response_mask[:, batch.input_ids.shape[1] - h.shape[1] :].float()  # (N, K)
    return DirectionalTokenTerms(TokenTerms(h.float(), lp.float(), mask), dh.float(), dl.float())


def token_unit_pieces(d: DirectionalTokenTerms, batch: RolloutBatch, estimator: str) -> TokenUnitPieces:
    """N_n, D_n, dN_n, dD_n of every unit of ``batch`` and its pooled sums, from one directional pass."""
    t = d.terms
    coeff = token_coefficients(t.entropy, t.logprob, t.mask, batch, estimator)
    dn, dd = unit_derivatives(coeff, d.d_entropy, d.d_logprob, batch)
    totals = unit_totals(t.entropy, t.mask, batch)
    return TokenUnitPieces(
        totals.numerator, totals.denominator, dn, dd, totals.entropy_sum, totals.token_count
    )


@dataclass
class TokenProjections:
    """One pass over this rank's E units for the token-level entropy (``token_entropy``).

    pieces: ``(B, 4)`` float64 ``(N_n, D_n, dN_n, dD_n)``, eval-unit order; dN, dD along v.
    groups: ``(B, 2, n_groups)`` float64 ``(dN_n, dD_n)`` by parameter group when asked for, else None
        (``groups.sum(-1)`` is ``pieces[:, 2:]``).
    sums: ``(2,)`` float64 pooled ``(sum_i A_i, sum_i L_i)`` over the rows: the trainers' formula.
    seq_logprob: ``(N,)`` fp32 S_i at theta (detached, row order), as the sequence engines keep it.
    x_num, x_den: per half of E (``halves``), the sums of the gradients of the units' numerator and
        denominator surrogates (parameter-shaped fp32), else None.
    """

    pieces: Tensor
    groups: Tensor | None
    sums: Tensor
    seq_logprob: Tensor
    x_num: tuple[Vector, Vector] | None = None
    x_den: tuple[Vector, Vector] | None = None
    tokens: ResponseTokens | None = None
    """per-token log-probs and entropies at theta, response-aligned (``measure_change`` starts from them)"""
    d_seq: Tensor | None = None
    """``(N,)`` fp32 dS_i = sum_t m_t dl_t along v, row order, when a forward-mode pass gave the dl_t (the
    jvp engine), else None: ``EvalProjections.d_seq``"""

    @classmethod
    def empty(
        cls, n_units: int, n_rows: int, v: Vector, with_halves: bool, n_groups: int | None, device
    ) -> "TokenProjections":
        """Zero buffers to fill unit by unit (``n_units = 0``: a rank holding no E unit)."""
        f64 = dict(dtype=torch.float64, device=device)
        groups = None if n_groups is None else torch.zeros(n_units, 2, n_groups, **f64)
        halves_of = lambda: tuple({n: torch.zeros_like(t) for n, t in v.items()} for _ in range(2))  # noqa: E731
        return cls(
            torch.zeros(n_units, 4, **f64),
            groups,
            torch.zeros(2, **f64),
            torch.zeros(n_rows, dtype=torch.float32, device=device),
            halves_of() if with_halves else None,
            halves_of() if with_halves else None,
        )

    def put_totals(self, units: list[int], rows: Tensor, terms: TokenTerms, batch: RolloutBatch) -> None:
        """N_n, D_n, the pooled sums and S_i of one microbatch (``batch``: its units, in order)."""
        totals = unit_totals(terms.entropy, terms.mask, batch)
        idx = torch.as_tensor(units, device=self.pieces.device)
        self.pieces[idx, 0], self.pieces[idx, 1] = totals.numerator, totals.denominator
        self.sums += torch.stack([totals.entropy_sum, totals.token_count]).to(self.sums.device)
        self.seq_logprob[rows] = terms.logprob.detach().float().sum(1)
        if self.tokens is not None:
            self.tokens.put(rows, terms.logprob, terms.entropy, terms.mask)


def backward_token_projections(
    module: nn.Module,
    params: Params,
    batch: RolloutBatch,
    v: Vector,
    temperature: float,
    halves: Tensor | None = None,
    group_index: Tensor | None = None,
) -> TokenProjections:
    """One forward and two reverse passes per E unit (numerator, then denominator surrogate), each
    projected on v parameter by parameter as it forms (``backward.projected_backward``)."""
    n_groups = None if group_index is None else int(group_index.max()) + 1
    out = TokenProjections.empty(*_sizes(batch), v, halves is not None, n_groups, batch.device)
    out.tokens = ResponseTokens.zeros(batch)
    for mb in batch.microbatches(1):
        t = token_terms(module, mb.batch, temperature)
        coeff = token_coefficients(t.entropy, t.logprob, t.mask, mb.batch)
        h = None if halves is None else int(halves[mb.units[0]])
        x_num = None if h is None else out.x_num[h]
        x_den = None if h is None else out.x_den[h]
        num = projected_backward(numerator_surrogate(coeff, t.entropy, t.logprob), params, v, x_num, True)
        den = projected_backward(denominator_surrogate(coeff, t.logprob), params, v, x_den)  # (K,) each
        u = mb.units[0]
        out.pieces[u, 2], out.pieces[u, 3] = num.double().sum(), den.double().sum()
        if group_index is not None:  # float64 per-group sums of the per-parameter dots
            for j, dots in enumerate((num, den)):
                out.groups[u, j] = torch.zeros(n_groups, dtype=torch.float64, device=dots.device).index_add_(
                    0, group_index, dots.double()
                )
            out.pieces[u, 2:] = out.groups[u].sum(-1)
        out.put_totals(mb.units, mb.rows, t, mb.batch)
    return out


def jvp_token_projections(
    module: nn.Module,
    params: Params,
    batch: RolloutBatch,
    v: Vector,
    temperature: float,
    microbatch_units: int,
    halves: Tensor | None = None,
) -> TokenProjections:
    """dN_n, dD_n of a microbatch of units per forward-mode pass (and every row's dS_i); with ``halves``
    also the half sums of the surrogates' gradients, by reverse passes over each half's microbatches (no
    per-unit backward)."""
    out = TokenProjections.empty(*_sizes(batch), v, halves is not None, None, batch.device)
    out.tokens = ResponseTokens.zeros(batch)
    out.d_seq = torch.empty(batch.n_sequences, dtype=torch.float32, device=batch.device)  # (N,)
    with forward_mode_ready(module):
        for mb in batch.microbatches(microbatch_units):
            d = directional_token_terms(module, params, mb.batch, v, temperature)
            out.d_seq[mb.rows] = (d.d_logprob * d.terms.mask).sum(1)  # (N_mb, K) -> (N_mb,)
            pieces = token_unit_pieces(d, mb.batch, "rao-blackwell")
            idx = torch.as_tensor(mb.units, device=out.pieces.device)
            out.pieces[idx, 2], out.pieces[idx, 3] = pieces.d_numerator, pieces.d_denominator
            out.put_totals(mb.units, mb.rows, d.terms, mb.batch)
    if halves is not None:
        for h in (0, 1):
            units = (halves == h).nonzero().reshape(-1).tolist()
            for mb in batch.select_units(units).microbatches(microbatch_units) if units else ():
                t = token_terms(module, mb.batch, temperature)
                coeff = token_coefficients(t.entropy, t.logprob, t.mask, mb.batch)
                surrogate = numerator_surrogate(coeff, t.entropy, t.logprob)
                projected_backward(surrogate, params, v, out.x_num[h], True)
                projected_backward(denominator_surrogate(coeff, t.logprob), params, v, out.x_den[h])
    return out


def _sizes(batch: RolloutBatch) -> tuple[int, int]:
    return batch.n_units, batch.n_sequences
