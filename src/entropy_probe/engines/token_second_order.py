"""The second-order pass of the token-level functional: per-unit s_n and q_n
(docs/design.md sections 8 and 16).

One nested forward-mode pass per microbatch (``torch.func.jvp`` of a ``jvp``, both along v, as
``second_order`` does for the sequence functional, under the same ``second_order_ready``) gives every
response token's log-prob ``l_k`` and exact entropy ``H_k`` with their first and second derivatives
along ``theta + t v``. ``token_functional.unit_taylor`` turns them into each unit's ``(N_n, D_n)`` and
their two derivatives by differentiating the very estimator the truth evaluates; once every rank's
units are gathered (the ratio needs all of them) ``unit_value_derivatives`` gives the jackknifed ratio's
per-unit s_n and q_n. ``mean_n q_n`` is unbiased for the second derivative of each unit's numerator and
denominator and, through the ratio, for ``v^T (grad^2 H_tok) v`` up to the ratio's O(1/B^2) bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..batch import RolloutBatch
from ..response_tokens import ResponseTokens, response_order, response_tokens
from ..token_functional import unit_taylor
from ..vectors import Params, Vector
from .second_order import second_order_ready


@dataclass
class TokenDirectional:
    """Per-token terms at theta and their first and second derivatives along v, all ``(N, L)``, detached."""

    terms: ResponseTokens
    d_logp: Tensor
    d2_logp: Tensor
    d_entropy: Tensor
    d2_entropy: Tensor


def token_directional_terms(
    module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, temperature: float, width: int
) -> TokenDirectional:
    """One nested jvp pass over ``batch``; the caller wraps it in ``second_order_ready``."""
    primals = {name: p.detach() for name, p in params.items()}
    tangents = {name: v[name].to(dtype=p.dtype) for name, p in params.items()}
    _, mask = response_order(batch.response_mask, width)  # (N, L), outside the transforms

    def logp_and_entropy(theta):
        t = response_tokens(module, batch, temperature, width, params=theta)
        return t.logp, t.entropy

    def first(theta):  # (l, H, dl, dH) at theta, derivatives along v
        out, d_out = torch.func.jvp(logp_and_entropy, (theta,), (tangents,))
        return (*out, *d_out)

    with torch.no_grad():  # forward mode needs no autograd graph
        (logp, entropy, dl, dh), (_, _, d2l, d2h) = torch.func.jvp(first, (primals,), (tangents,))
    terms = ResponseTokens(logp.detach().float(), entropy.detach().float(), mask)
    return TokenDirectional(terms, *(x.detach().double() for x in (dl, d2l, dh, d2h)))


def eval_token_taylor(
    module: nn.Module,
    params: Params,
    batch: RolloutBatch,
    v: Vector,
    temperature: float,
    units: int,
    tokens: ResponseTokens | None = None,
    d_seq: Tensor | None = None,
) -> Tensor:
    """``(B_E, 3, 2)`` float64 ``unit_taylor`` of every unit of ``batch``, ``units`` units per pass.
    ``tokens``: ``ResponseTokens.zeros(batch)`` to fill with every row's l_k, H_k at theta (the pass has
    them: ``forecast.shared_token_pass`` keeps them for ``measure_change``); ``d_seq``: an ``(N,)`` fp32
    buffer to fill with every row's dS_i = sum_k dl_k (the large-step diagnostic's, ``lookahead``)."""
    width = int(batch.response_lengths.max())
    out = torch.empty(batch.n_units, 3, 2, dtype=torch.float64, device=batch.device)
    with second_order_ready(module):
        for mb in batch.microbatches(units):
            try:
                d = token_directional_terms(module, params, mb.batch, v, temperature, width)
            except NotImplementedError as e:  # an op without a forward derivative of its derivative
                raise NotImplementedError(
                    f"ProbeConfig.second_order: nested forward mode is not supported by an op of "
                    f"{type(module).__name__} ({e}); run with second_order=False"
                ) from e
            taylor = unit_taylor(mb.batch, d.terms, d.d_logp, d.d2_logp, d.d_entropy, d.d2_entropy)
            out[torch.as_tensor(mb.units, device=out.device)] = taylor
            if tokens is not None:  # same width (the batch's longest response): rows copy as they are
                tokens.logp[mb.rows], tokens.entropy[mb.rows] = d.terms.logp, d.terms.entropy
                tokens.mask[mb.rows] = d.terms.mask
            if d_seq is not None:
                d_seq[mb.rows] = (d.d_logp * d.terms.mask).sum(1).float()  # (N_mb, L) -> (N_mb,)
    return out
