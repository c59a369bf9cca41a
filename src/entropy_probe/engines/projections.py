"""What one pass over E gives, whichever engine made it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..batch import RolloutBatch
from ..logprobs import SequenceLogProbs
from ..vectors import Vector


@dataclass
class EvalProjections:
    """The per-unit projections of one pass over E.

    s: ``(B_E,)`` fp32 s_n = v . X_n, eval-unit order.
    logprobs: ``(N,)`` fp32 S_i and S_w,i at theta (detached), batch row order; the entropy on E and
        the importance weights of a later measurement start from these (``seq_logprob``, ``weighted``).
    x_half: ``(sum_{n in A} X_n, sum_{n in B} X_n)`` (fp32, parameter-shaped) over the two halves of
        E named by ``halves`` when asked for, else None (the variance over U, docs/design.md section 7).
    s_groups: ``(B_E, n_groups)`` float64 s_n^(g) = X_n^(g) . v^(g) by parameter group when asked for
        (``attribution``), else None; ``s_groups.sum(1)`` is s_n in float64.
    entropy_sum: see the field.
    """

    s: Tensor
    logprobs: SequenceLogProbs
    x_half: tuple[Vector, Vector] | None = None
    s_groups: Tensor | None = None
    entropy_sum: Tensor | None = None
    """float64 scalar: this rank's unit entropies summed, when the pass computed them itself (the token-level
    pieces: ``token_statistics``); None: ``objectives.unit_entropy`` of ``logprobs.weighted``."""
    tokens: object | None = None
    """``response_tokens.ResponseTokens`` at theta when E was read through the exact H_t, else None"""
    d_seq: Tensor | None = None
    """``(N,)`` fp32 dS_i = grad S_i . v, batch row order, when the pass computed it exactly (forward mode:
    the jvp engine), else None. The large-step diagnostic reads ``l_i = eta dS_i`` from it instead of
    running its stepped forward (``lookahead.large_step``)."""

    @classmethod
    def empty(cls, batch: RolloutBatch, v: Vector, halves: Tensor | None) -> "EvalProjections":
        """Buffers to fill unit by unit: s of size B_E, the two (N,) log-prob rows, zero half sums."""
        x_half = None
        if halves is not None:
            x_half = tuple({name: torch.zeros_like(t) for name, t in v.items()} for _ in range(2))
        s = torch.empty(batch.n_units, dtype=torch.float32, device=batch.device)
        return cls(s, SequenceLogProbs.empty(batch), x_half)

    @property
    def seq_logprob(self) -> Tensor:
        return self.logprobs.seq

    @property
    def weighted(self) -> Tensor:
        return self.logprobs.weighted
