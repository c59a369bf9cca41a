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
from ..logprobs import policy_logprobs
from ..objectives import entropy_surrogate, update_surrogate
from ..vectors import Params, Vector, device_of, grad_of
from .projections import EvalProjections


def update_gradient(
    module: nn.Module, params: Params, batch: RolloutBatch, coeff: Tensor, cfg: ProbeConfig
) -> dict[str, Tensor | None]:
    """grad of ``sum_i coeff_i S_i`` over the batch (coeff: ``(N,)`` in batch row order)."""
    total: dict[str, Tensor | None] = {name: None for name in params}
    for mb in batch.microbatches(cfg.microbatch_units):
        lp = policy_logprobs(module, mb.batch, cfg)
        grads = grad_of(update_surrogate(lp.seq, coeff[mb.rows]), params)
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
        lp = policy_logprobs(module, mb.batch, cfg)
        x_half = None if out.x_half is None else out.x_half[int(halves[mb.units[0]])]
        surrogate = entropy_surrogate(lp, mb.batch, cfg.x_estimator)
        dots = projected_backward(surrogate, params, v, x_half)  # (K,) of X_n . v
        s.append(dots.sum() if index is None else _group_sums(dots, index))
        out.logprobs.put(mb.rows, lp)
    if index is None:
        out.s = torch.stack(s)  # (B_E,)
    else:
        out.s_groups = torch.stack(s)  # (B_E, n_groups) float64
        out.s = out.s_groups.sum(dim=1).float()
    return out


def projected_backward(
    loss: Tensor, params: Params, v: Vector, x_sum: Vector | None = None, retain_graph: bool = False
) -> Tensor:
    """``(K,)`` fp32 ``<d loss / d p, v[p]>`` per parameter, ``params`` order (0 where the loss does not
    reach p), and ``x_sum += d loss / d params`` when given: one reverse pass in which each parameter's
    gradient is used the moment it is formed and then dropped, so the gradient is never held whole
    (1x the parameters less at the peak than ``grad_of``; DESIGN section 17).

    A tensor hook on each parameter (removed on exit) takes the gradient and hands autograd back a
    zero-stride zero of the same shape; ``torch.autograd.grad`` fires no DDP hook and leaves ``.grad``
    alone, as everywhere in the probe. Hooks the caller registered run first, as they would for
    ``grad_of``. ``retain_graph``: keep the graph for a second reverse pass over the same forward.
    """
    dots = torch.zeros(len(params), dtype=torch.float32, device=device_of(params))  # (K,)
    hooks = [
        p.register_hook(_dot_and_drop(dots, i, v[n], x_sum, n)) for i, (n, p) in enumerate(params.items())
    ]
    try:
        torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=retain_graph)
    finally:
        for hook in hooks:
            hook.remove()
    return dots


def _dot_and_drop(dots: Tensor, i: int, v: Tensor, x_sum: Vector | None, name: str):
    def hook(g: Tensor) -> Tensor:
        dots[i] = torch.vdot(g.reshape(-1).float(), v.reshape(-1))
        if x_sum is not None:
            x_sum[name].add_(g.float())
        return torch.zeros((), dtype=g.dtype, device=g.device).expand_as(g)  # no storage: g is freed

    return hook


def _group_sums(dots: Tensor, index: Tensor) -> Tensor:
    """``(n_groups,)`` float64 ``X^(g) . v^(g)``: the per-parameter fp32 dots summed per group."""
    n_groups = int(index.max()) + 1
    return torch.zeros(n_groups, dtype=torch.float64, device=index.device).index_add_(0, index, dots.double())


def unit_gradients(
    module: nn.Module, params: Params, batch: RolloutBatch, coeff: Tensor, cfg: ProbeConfig
) -> Iterator[tuple[int, dict[str, Tensor | None]]]:
    """``(m, grad J_m)`` for each U unit in turn, ``J_m = sum_{i in m} coeff_i S_i``: one backward per
    unit and only one unit's gradient alive at a time (the caller drops it before the next)."""
    for mb in batch.microbatches(1):
        lp = policy_logprobs(module, mb.batch, cfg)
        yield mb.units[0], grad_of(update_surrogate(lp.seq, coeff[mb.rows]), params)
