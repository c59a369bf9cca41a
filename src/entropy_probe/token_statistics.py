"""From every rank's token-level pieces to this rank's s_n, so that the statistics of docs/design.md
section 5 apply.

The token-level entropy is a ratio of means over all E units, so a unit's s_n (``ratio_statistics``)
depends on every unit: the pieces ``(N_n, D_n, dN_n, dD_n)`` (and their parameter groups) of all ranks
are gathered in one collective, every rank computes every s_n, and keeps its own units' values. From
there ``eval_statistics``, attribution and the rest treat them like any s_n.

For ``entropy="sequence"`` with ``"sum"`` weighting the numerator alone is the functional
(``E[sum_t m_t H_t] = E[-S]``): s_n = dN_n, the same Rao-Blackwellised numerator, no ratio.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .attribution import parameter_groups
from .batch import RolloutBatch
from .engines import EvalProjections, TokenProjections
from .logprobs import SequenceLogProbs
from .ratio_statistics import ratio_unit_values
from .vectors import Vector, device_of


class TokenValues(NamedTuple):
    """This rank's ``s`` ``(B_local,)`` fp32 and ``s_groups`` ``(B_local, n_groups)`` float64 (or None), the
    entropy summed over this rank's units as ``eval_statistics`` averages it, and X summed per half."""

    s: Tensor
    s_groups: Tensor | None
    entropy_sum: Tensor
    x_half: tuple[Vector, Vector] | None


def token_values(comm, proj: TokenProjections, sizes: list[int], ratio: bool) -> TokenValues:
    """``sizes``: E units per rank (rank order). ``ratio``: the token-level ratio, else the numerator."""
    rank, n_local = comm.rank, proj.pieces.shape[0]
    offset = sum(sizes[:rank])
    flat = [proj.pieces.reshape(n_local, 4)]  # explicit widths: a rank without units reshapes 0 rows
    if proj.groups is not None:
        flat.append(proj.groups.reshape(n_local, 2 * proj.groups.shape[-1]))
    if sum(sizes) == 0:  # every rank knows the sizes: all raise, before the gather (as eval_statistics does)
        raise ValueError("eval_batch: no rank holds any evaluation unit")
    gathered = comm.gather(torch.cat(flat, dim=1), sizes)  # (B_E, 4 [+ 2 n_groups]) in rank order
    pieces = gathered[:, :4]
    n, d, dn, dd = pieces.unbind(dim=1)
    groups = None if proj.groups is None else gathered[:, 4:].reshape(-1, 2, proj.groups.shape[-1])
    if ratio:
        s_all = ratio_unit_values(dn, dd, n, d)  # (B_E,)
        g_all = None if groups is None else ratio_unit_values(groups[:, 0], groups[:, 1], n, d)  # (B_E, K)
        sums = proj.sums.clone()
        comm.sum_([sums])  # pooled over every rank's rows: the trainers' sum(m H) / sum(m)
        entropy = sums[0] / sums[1] * n_local  # eval_statistics divides the ranks' sum by B_E
    else:
        s_all, g_all = dn, None if groups is None else groups[:, 0]
        entropy = n[offset : offset + n_local].sum()
    mine = slice(offset, offset + n_local)
    s_groups = None if g_all is None else g_all[mine].contiguous()
    x_half = None if proj.x_num is None else _half_sums(proj, n, d, ratio)
    return TokenValues(s_all[mine].float(), s_groups, entropy.double(), x_half)


def _half_sums(proj: TokenProjections, n: Tensor, d: Tensor, ratio: bool) -> tuple[Vector, Vector]:
    """This rank's per-half sums of X_n (``update_jackknife.half_means`` averages them over all ranks):
    ``(sum grad N_n - H_h sum grad D_n) / Dbar_h`` with the ratio and mean denominator of half h alone, so
    the two halves stay independent. Formed in place in the numerator sums."""
    if not ratio:
        return proj.x_num
    # eval_halves: the parity of the global (= gathered) position
    parity = torch.arange(n.shape[0], device=n.device) % 2
    out = []
    for h in (0, 1):
        keep = (parity == h).to(n.device)
        if not keep.any():
            out.append(proj.x_num[h])
            continue
        h_ratio = float(n[keep].sum() / d[keep].sum())
        d_mean = float(d[keep].mean())
        x = proj.x_num[h]
        for name, t in x.items():
            t.sub_(proj.x_den[h][name], alpha=h_ratio).div_(d_mean)
        out.append(x)
    return out[0], out[1]


def token_eval_projections(
    call, batch: RolloutBatch | None, v: Vector, halves: Tensor | None, sizes: list[int]
) -> EvalProjections:
    """``EntropyProbe._project_eval`` through the exact H_t: this rank's pieces by the configured engine
    (``call.passes``), every rank's gathered, this rank's s_n (and s_n^(g), X per half) from them.

    ``sizes``: E units per rank; ``batch`` None: a rank holding no E unit, which still joins the gathers."""
    cfg = call.config
    if batch is not None:
        tp = call.passes.token_projections(call.module, call.params, batch, v, cfg, halves)
    else:
        n_groups = len(parameter_groups(call.params, cfg.groups)[0]) if cfg.computes_groups else None
        tp = TokenProjections.empty(0, 0, v, halves is not None, n_groups, device_of(call.params))
    return projections_from_pieces(call, tp, sizes)


def projections_from_pieces(call, tp: TokenProjections, sizes: list[int]) -> EvalProjections:
    """This rank's s_n (and s_n^(g), X per half, the S_i kept for ``measure_change``) from its token-level
    pieces ``tp``, by whichever pass made them (the E pass, or ``forecast.shared_token_pass``)."""
    cfg = call.config
    values = token_values(call.comm, tp, sizes, ratio=cfg.entropy == "token")
    # S_w of the sequence functional for a later measure_change: with "sum" weighting it is S itself
    seq = tp.seq_logprob
    weighted = seq if cfg.entropy == "sequence" else torch.full_like(seq, math.nan)
    # the sequence functional keeps its documented entropy, mean_n -(1/G) sum_i S_i (from ``weighted``)
    entropy_sum = values.entropy_sum if cfg.entropy == "token" else None
    logprobs = SequenceLogProbs(seq, weighted)
    return EvalProjections(
        values.s, logprobs, values.x_half, values.s_groups, entropy_sum, tp.tokens, tp.d_seq
    )
