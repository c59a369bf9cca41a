"""The "backward" engine: gradients of U and per-unit projections on E, by reverse mode.

- ``update_gradient``: grad J_U, summed over microbatches of U units (one backward each).
- ``eval_projections``: the note's loop. One forward and one backward per E unit gives X_n; its
  projection ``s_n = v . X_n`` is one fused reduction kept on the device (no ``.item()`` per
  parameter, no host sync per unit). Optionally also the sums of X_n over two halves of E (se_total).
- ``unit_gradients``: ``grad J_m`` of one U unit at a time, one backward each (the jackknife over U).

Gradients come from ``torch.autograd.grad``, so the caller's ``.grad`` is never touched and no DDP
hook fires. Every function takes the *unwrapped* module and the dict of trainable parameters.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

from ..attribution import parameter_groups
from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..logprobs import sequence_logprobs
from ..objectives import entropy_gradient_coefficients
from ..vectors import Params, Vector, add_into, dot, grad_of
from .projections import EvalProjections


def update_gradient(
    module: nn.Module, params: Params, batch: RolloutBatch, coeff: Tensor, cfg: ProbeConfig
) -> dict[str, Tensor | None]:
    """grad of ``sum_i coeff_i S_i`` over the batch (coeff: ``(N,)`` in batch row order)."""
    total: dict[str, Tensor | None] = {name: None for name in params}
    for mb in batch.microbatches(cfg.microbatch_units):
        lp = sequence_logprobs(module, mb.batch, cfg.temperature, cfg.entropy_weighting)
        grads = grad_of((coeff[mb.rows] * lp.seq).sum(), params)
        for name, g in grads.items():
            if g is not None:
                total[name] = g.float() if total[name] is None else total[name].add_(g.float())
        grads = g = None  # else the next backward runs while this microbatch's gradients are still held
    return total


def eval_projections(
    module: nn.Module,
    params: Params,
    batch: RolloutBatch,
    v: Vector,
    cfg: ProbeConfig,
    halves: Tensor | None = None,
    want_groups: bool = False,
) -> EvalProjections:
    """s_n for every E unit, one forward and one backward per unit (the note's loop).

    With ``halves`` also the sums of X_n over the two halves of E (``se_total``). With ``want_groups``
    also s_n^(g) per parameter group (``cfg.groups``): one dot per parameter, summed per group in
    float64, so the groups add up to s_n exactly.
    """
    s = []
    out = EvalProjections.empty(batch, v, halves)
    index = parameter_groups(params, cfg.groups)[1].to(batch.device) if want_groups else None
    for mb in batch.microbatches(1):
        lp = sequence_logprobs(module, mb.batch, cfg.temperature, cfg.entropy_weighting)
        a, e = entropy_gradient_coefficients(lp.weighted, mb.batch, cfg.x_estimator)
        grads = grad_of((a * lp.seq + e * lp.weighted).sum(), params)  # X_n
        s.append(dot(grads, v) if index is None else _group_dots(grads, v, index))
        if out.x_half is not None:
            add_into(out.x_half[int(halves[mb.units[0]])], grads)
        out.seq_logprob[mb.rows], out.weighted[mb.rows] = lp.seq.detach(), lp.weighted.detach()
        del grads  # else the next unit's backward runs while this X_n is still held: 2 gradient copies
    if index is None:
        out.s = torch.stack(s)  # (B_E,)
    else:
        out.s_groups = torch.stack(s)  # (B_E, n_groups) float64
        out.s = out.s_groups.sum(dim=1).float()
    return out


def _group_dots(grads: dict[str, Tensor | None], v: Vector, index: Tensor) -> Tensor:
    """``(n_groups,)`` float64 ``X^(g) . v^(g)``: one fp32 dot per parameter, summed per group."""
    zero = torch.zeros((), dtype=torch.float32, device=index.device)
    terms = torch.stack(
        [
            zero if g is None else torch.vdot(g.reshape(-1).float(), v[name].reshape(-1))
            for name, g in grads.items()
        ]
    )  # (K,) in params order
    n_groups = int(index.max()) + 1
    return torch.zeros(n_groups, dtype=torch.float64, device=index.device).index_add_(
        0, index, terms.double()
    )


def unit_gradients(
    module: nn.Module, params: Params, batch: RolloutBatch, coeff: Tensor, cfg: ProbeConfig
) -> Iterator[tuple[int, dict[str, Tensor | None]]]:
    """``(m, grad J_m)`` for each U unit in turn, ``J_m = sum_{i in m} coeff_i S_i``: one backward per
    unit and only one unit's gradient alive at a time (the caller drops it before the next)."""
    for mb in batch.microbatches(1):
        lp = sequence_logprobs(module, mb.batch, cfg.temperature, cfg.entropy_weighting)
        yield mb.units[0], grad_of((coeff[mb.rows] * lp.seq).sum(), params)
