"""The "backward" engine: gradients of U and per-unit projections on E, by reverse mode.

- ``update_gradient``: grad J_U, summed over microbatches of U units (one backward each).
- ``eval_projections``: the note's loop. One forward and one backward per E unit gives X_n; its
  projection ``s_n = v . X_n`` is one fused reduction kept on the device (no ``.item()`` per
  parameter, no host sync per unit). Optionally also ``sum_n X_n`` for the V_Y term.
- ``update_projections``: ``t_m = grad J_m . u`` per U unit (u = scale * Xbar_E), one backward each.

Gradients come from ``torch.autograd.grad``, so the caller's ``.grad`` is never touched and no DDP
hook fires. Every function takes the *unwrapped* module and the dict of trainable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batch import RolloutBatch
from .logprobs import sequence_logprobs
from .objectives import entropy_gradient_coefficients

Params = dict[str, nn.Parameter]
Vector = dict[str, Tensor]


def grad_of(loss: Tensor, params: Params) -> dict[str, Tensor | None]:
    """d loss / d params; None for a parameter the loss does not reach."""
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return dict(zip(params.keys(), grads))


def dot(grads: dict[str, Tensor | None], vec: Vector) -> Tensor:
    """``sum_p <grads[p], vec[p]>`` as one fp32 device scalar (no host sync)."""
    terms = [torch.vdot(g.reshape(-1).float(), vec[name].reshape(-1)) for name, g in grads.items() if g is not None]
    if not terms:
        return torch.zeros((), dtype=torch.float32, device=next(iter(vec.values())).device)
    return torch.stack(terms).sum()


def first_nonfinite(vec: dict[str, Tensor | None]) -> str | None:
    """The name of the first entry holding a NaN or inf, or None; one host sync for the whole vector."""
    names = [name for name, t in vec.items() if t is not None]
    if not names:
        return None
    ok = torch.stack([torch.isfinite(vec[name]).all().to(vec[names[0]].device) for name in names])  # (K,)
    bad = (~ok).nonzero()
    return names[int(bad[0, 0])] if len(bad) else None


def add_into(acc: Vector, grads: dict[str, Tensor | None]) -> None:
    for name, g in grads.items():
        if g is not None:
            acc[name].add_(g.float())


@dataclass
class EvalProjections:
    """What one pass over E gives.

    s: ``(B_E,)`` fp32 s_n = v . X_n, eval-unit order.
    seq_logprob, weighted: ``(N,)`` fp32 S_i and S_w,i at theta (detached), batch row order.
    x_sum: ``sum_n X_n`` (fp32, parameter-shaped) when asked for, else None.
    """

    s: Tensor
    seq_logprob: Tensor
    weighted: Tensor
    x_sum: Vector | None = None


def update_gradient(module: nn.Module, params: Params, batch: RolloutBatch, coeff: Tensor, *, temperature: float,
                    weighting: str, microbatch_units: int) -> dict[str, Tensor | None]:
    """grad of ``sum_i coeff_i S_i`` over the batch (coeff: ``(N,)`` in batch row order)."""
    total: dict[str, Tensor | None] = {name: None for name in params}
    for units, mb in batch.microbatches(microbatch_units):
        rows = batch.rows_of_units(units)
        lp = sequence_logprobs(module, mb, temperature, weighting)
        grads = grad_of((coeff[rows] * lp.seq).sum(), params)
        for name, g in grads.items():
            if g is not None:
                total[name] = g.float() if total[name] is None else total[name].add_(g.float())
    return total


def eval_projections(module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, *, temperature: float,
                     weighting: str, estimator: str, want_x_sum: bool) -> EvalProjections:
    """s_n for every E unit, one forward and one backward per unit (the note's loop)."""
    s = []
    seq = torch.empty(batch.n_sequences, dtype=torch.float32, device=batch.device)
    weighted = torch.empty_like(seq)
    x_sum = {name: torch.zeros_like(t) for name, t in v.items()} if want_x_sum else None
    for unit in range(batch.n_units):
        rows = batch.rows_of_units([unit])
        sub = batch.select_units([unit])
        lp = sequence_logprobs(module, sub, temperature, weighting)
        a, e = entropy_gradient_coefficients(lp.weighted, sub, estimator)
        grads = grad_of((a * lp.seq + e * lp.weighted).sum(), params)  # X_n
        s.append(dot(grads, v))
        if x_sum is not None:
            add_into(x_sum, grads)
        seq[rows.to(seq.device)] = lp.seq.detach()
        weighted[rows.to(seq.device)] = lp.weighted.detach()
    return EvalProjections(torch.stack(s), seq, weighted, x_sum)


def update_projections(module: nn.Module, params: Params, batch: RolloutBatch, coeff: Tensor, u: Vector, *,
                       temperature: float, weighting: str) -> Tensor:
    """``(B_U,)`` t_m = grad J_m . u with ``J_m = sum_{i in m} coeff_i S_i``, one backward per unit."""
    t = []
    for unit in range(batch.n_units):
        rows = batch.rows_of_units([unit])
        lp = sequence_logprobs(module, batch.select_units([unit]), temperature, weighting)
        t.append(dot(grad_of((coeff[rows] * lp.seq).sum(), params), u))
    return torch.stack(t)
