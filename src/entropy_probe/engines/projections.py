"""What one pass over E gives, whichever engine made it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..batch import RolloutBatch
from ..vectors import Vector


@dataclass
class EvalProjections:
    """The per-unit projections of one pass over E.

    s: ``(B_E,)`` fp32 s_n = v . X_n, eval-unit order.
    seq_logprob, weighted: ``(N,)`` fp32 S_i and S_w,i at theta (detached), batch row order; the
        entropy on E and the importance weights of a later measurement start from these.
    x_sum: ``sum_n X_n`` (fp32, parameter-shaped) when asked for, else None.
    s_groups: ``(B_E, n_groups)`` float64 s_n^(g) = X_n^(g) . v^(g) by parameter group when asked for
        (``attribution``), else None; ``s_groups.sum(1)`` is s_n in float64.
    """

    s: Tensor
    seq_logprob: Tensor
    weighted: Tensor
    x_sum: Vector | None = None
    s_groups: Tensor | None = None

    @classmethod
    def empty(cls, batch: RolloutBatch, v: Vector, want_x_sum: bool) -> "EvalProjections":
        """Buffers to fill unit by unit: s of size B_E, the two (N,) log-prob rows, a zero x_sum."""
        seq = torch.empty(batch.n_sequences, dtype=torch.float32, device=batch.device)
        x_sum = {name: torch.zeros_like(t) for name, t in v.items()} if want_x_sum else None
        s = torch.empty(batch.n_units, dtype=torch.float32, device=batch.device)
        return cls(s, seq, torch.empty_like(seq), x_sum)
