"""The probe's arithmetic on sharded parameters (FSDP2 layout), DESIGN section 17.

Under ``torch.distributed.fsdp.fully_shard`` every rank holds dim-0 shards of each parameter, of its
gradient and of the optimizer state (``Shard(0)``: ``torch.chunk`` of dim 0, the last ranks' chunks
may be shorter or empty). Everything the probe computes on parameter-shaped vectors is either
elementwise (the direction rules of ``direction.py``: sgd, Adam's preconditioner and step) and so
runs unchanged on the shards, or a reduction, which becomes a local partial sum plus one all-reduce:

- ``global_dot``: ``v . X = sum over ranks of v_r . X_r``;
- ``clip_coefficient``: ``clip_grad_norm_`` needs the norm of the whole gradient:
  ``sqrt(sum over ranks of |g_r|^2)``, and multiplies every shard by the same factor.

The probe's passes on an FSDP2 model are in ``fsdp.py``: ``from_grad`` builds v on the local shards
(elementwise, as here) and each s_n is a local partial dot plus an all-reduce (batched over E there).
These helpers check that arithmetic on its own (tests/test_fsdp.py); ``clip_coefficient`` serves a
trainer-side clip, since ``from_grad`` reads a gradient the trainer clipped already.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .direction import CLIP_EPS
from .vectors import Vector, dot


def shard_of(t: Tensor, rank: int, world: int) -> Tensor:
    """This rank's dim-0 shard in FSDP2's layout (``torch.chunk``; empty for a rank past the last chunk)."""
    chunks = torch.chunk(t, world, dim=0)
    return chunks[rank] if rank < len(chunks) else t.new_empty((0, *t.shape[1:]))


def global_dot(comm, a: dict[str, Tensor | None], b: Vector) -> Tensor:
    """``sum_p <a[p], b[p]>`` over the whole (sharded) vectors: local fp32 partial sum, one all-reduce."""
    local = dot(a, b).reshape(1).clone()  # (1,)
    comm.sum_([local])
    return local[0]


def clip_coefficient(comm, grads: dict[str, Tensor | None], max_norm: float | None) -> float:
    """The factor ``clip_grad_norm_(max_norm)`` applies to every shard: the norm is over all ranks' shards."""
    if max_norm is None:
        return 1.0
    squares = [g.float().square().sum() for g in grads.values() if g is not None and g.numel()]
    local = (torch.stack(squares).sum() if squares else torch.zeros(())).reshape(1).double()  # (1,)
    comm.sum_([local])
    return float(torch.clamp(max_norm / (local[0].sqrt() + CLIP_EPS), max=1.0))
