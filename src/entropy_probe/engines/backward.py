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

from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..logprobs import sequence_logprobs
from ..objectives import entropy_gradient_coefficients
from ..vectors import Params, Vector, add_into, dot, grad_of
from .projections import EvalProjections


def update_gradient(module: nn.Module, params: Params, batch: RolloutBatch, coeff: Tensor,
                    cfg: ProbeConfig) -> dict[str, Tensor | None]:
    """grad of ``sum_i coeff_i S_i`` over the batch (coeff: ``(N,)`` in batch row order)."""
    total: dict[str, Tensor | None] = {name: None for name in params}
    for mb in batch.microbatches(cfg.microbatch_units):
        lp = sequence_logprobs(module, mb.batch, cfg.temperature, cfg.entropy_weighting)
        grads = grad_of((coeff[mb.rows] * lp.seq).sum(), params)
        for name, g in grads.items():
            if g is not None:
                total[name] = g.float() if total[name] is None else total[name].add_(g.float())
    return total


def eval_projections(module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, cfg: ProbeConfig,
                     halves: Tensor | None = None) -> EvalProjections:
    """s_n for every E unit, one forward and one backward per unit (the note's loop)."""
    s = []
    out = EvalProjections.empty(batch, v, halves)
    for mb in batch.microbatches(1):
        lp = sequence_logprobs(module, mb.batch, cfg.temperature, cfg.entropy_weighting)
        a, e = entropy_gradient_coefficients(lp.weighted, mb.batch, cfg.x_estimator)
        grads = grad_of((a * lp.seq + e * lp.weighted).sum(), params)  # X_n
        s.append(dot(grads, v))
        if out.x_half is not None:
            add_into(out.x_half[int(halves[mb.units[0]])], grads)
        out.seq_logprob[mb.rows], out.weighted[mb.rows] = lp.seq.detach(), lp.weighted.detach()
    out.s = torch.stack(s)  # (B_E,)
    return out


def unit_gradients(module: nn.Module, params: Params, batch: RolloutBatch, coeff: Tensor,
                   cfg: ProbeConfig) -> Iterator[tuple[int, dict[str, Tensor | None]]]:
    """``(m, grad J_m)`` for each U unit in turn, ``J_m = sum_{i in m} coeff_i S_i``: one backward per
    unit and only one unit's gradient alive at a time (the caller drops it before the next)."""
    for mb in batch.microbatches(1):
        lp = sequence_logprobs(module, mb.batch, cfg.temperature, cfg.entropy_weighting)
        yield mb.units[0], grad_of((coeff[mb.rows] * lp.seq).sum(), params)
