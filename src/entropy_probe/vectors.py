"""Parameter-shaped vectors: ``{name: tensor}`` keyed like the model's trainable parameters.

v, X_n sums and gradients all live in this form; these helpers are the only arithmetic on them
that is not elementwise, and none of them syncs with the host per parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

Params = dict[str, nn.Parameter]
Vector = dict[str, Tensor]


def grad_of(loss: Tensor, params: Params) -> dict[str, Tensor | None]:
    """d loss / d params; None for a parameter the loss does not reach.

    ``torch.autograd.grad`` leaves the caller's ``.grad`` alone and fires no DDP hook.
    """
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return dict(zip(params.keys(), grads))


def dot(grads: dict[str, Tensor | None], vec: Vector) -> Tensor:
    """``sum_p <grads[p], vec[p]>`` as one fp32 device scalar (no host sync)."""
    terms = [
        torch.vdot(g.reshape(-1).float(), vec[name].reshape(-1)) for name, g in grads.items() if g is not None
    ]
    if not terms:
        return torch.zeros((), dtype=torch.float32, device=next(iter(vec.values())).device)
    return torch.stack(terms).sum()


def add_into(acc: Vector, grads: dict[str, Tensor | None]) -> None:
    """``acc += grads`` in place (fp32), skipping parameters the gradient does not reach."""
    for name, g in grads.items():
        if g is not None:
            acc[name].add_(g.float())


def first_nonfinite(vec: dict[str, Tensor | None]) -> str | None:
    """The name of the first entry holding a NaN or inf, or None; one host sync for the whole vector."""
    names = [name for name, t in vec.items() if t is not None]
    if not names:
        return None
    ok = torch.stack([torch.isfinite(vec[name]).all().to(vec[names[0]].device) for name in names])  # (K,)
    bad = (~ok).nonzero()
    return names[int(bad[0, 0])] if len(bad) else None


def device_of(params: Params) -> torch.device:
    """The device of the model's (first) trainable parameter."""
    return next(iter(params.values())).device


def stepped_parameters(params: Params, v: Vector, step: float, base: Vector | None = None) -> Vector:
    """``{name: theta + step * v}`` (no autograd, the live model untouched).

    Without ``base``, in each parameter's dtype. With ``base`` (``full_precision_state``): every fp32
    tensor of ``base``, the trainable ones stepped in fp32, so that a step below the rounding of a
    bf16/fp16 parameter is not lost.
    """
    with torch.no_grad():
        if base is None:
            return {name: (p.float() + step * v[name]).to(p.dtype) for name, p in params.items()}
        return {**base, **{name: base[name] + step * v[name] for name in params}}
