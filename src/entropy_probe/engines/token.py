"""The token-level entropy's per-unit pieces (``token_entropy``) from the model, by either engine.

- ``directional_token_terms``: H_t, l_t and their derivatives dH_t, dl_t along one direction for every
  response token of a batch, one ``torch.func.jvp`` pass (the caller wraps it in
  ``jvp.forward_mode_ready``);
- ``token_unit_pieces``: from those, the per-unit N_n, D_n, dN_n, dD_n (the jvp engine's route);
- (the backward engine builds the same unit surrogates, ``token_entropy.numerator_surrogate`` and
  ``denominator_surrogate``, and projects their gradients on v).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..batch import RolloutBatch
from ..logprobs import TokenTerms, token_terms
from ..token_entropy import (
    token_coefficients,
    unit_derivatives,
    unit_totals,
)
from ..vectors import Params, Vector


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
    primals = {name: p.detach() for name, p in params.items()}
    tangents = {name: direction[name].to(dtype=p.dtype) for name, p in params.items()}

    def entropy_and_logprob(theta):
        t = token_terms(module, batch, temperature, params=theta)
        return t.entropy, t.logprob

    with torch.no_grad():  # forward mode: nothing is built for a backward
        (h, lp), (dh, dl) = torch.func.jvp(entropy_and_logprob, (primals,), (tangents,))
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
