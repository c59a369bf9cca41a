"""Per-token log-probs and exact entropies of E, response-aligned (the inputs of the token functional).

The token-level functional (docs/design.md section 16) needs, for every response token k of every E row,
the token's log-prob ``l_k = log pi(y_k | y_<k)`` and the full-vocabulary entropy ``H_k`` of the
distribution that generated it (``logprobs.token_entropies``, at the sampling temperature). Rows
are left-padded by their prompt and microbatches trim the prompt columns (``keep_last``), so the
column of a response token depends on the batch; here every row is laid out by response position
instead: entry k is the row's k-th response token, ``mask`` False after its last. That layout is
what the reward-to-go sums and the per-position leave-one-out baselines of ``token_functional``
walk, and it is the same whatever microbatch or padding produced it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batch import RolloutBatch
from .logprobs import token_terms


@dataclass
class ResponseTokens:
    """``(N, L)`` response-aligned per-token quantities; L = the longest response of the batch."""

    logp: Tensor  # l_k = log pi(y_k | y_<k) at the temperature (0 where mask is False)
    entropy: Tensor  # H_k, the full-vocabulary entropy that generated y_k (0 where mask is False)
    mask: Tensor  # bool, True at the row's response tokens

    @property
    def seq(self) -> Tensor:
        """``(N,)`` S_i = sum_k l_k."""
        return self.logp.sum(dim=1)

    def rows(self, rows: Tensor) -> "ResponseTokens":
        return ResponseTokens(self.logp[rows], self.entropy[rows], self.mask[rows])

    @classmethod
    def zeros(cls, batch: RolloutBatch) -> "ResponseTokens":
        """Buffers for every row of ``batch``, as wide as its longest response, to ``put`` into."""
        width = int(batch.response_lengths.max())
        logp = torch.zeros(batch.n_sequences, width, dtype=torch.float32, device=batch.device)
        mask = torch.zeros(batch.n_sequences, width, dtype=torch.bool, device=batch.device)
        return cls(logp, torch.zeros_like(logp), mask)

    def put(self, rows: Tensor, logprob: Tensor, entropy: Tensor, mask: Tensor) -> None:
        """Store a microbatch's ``(n, K)`` column-layout terms (``logprobs.TokenTerms``) at ``rows``."""
        cols, aligned_mask = response_order(mask, self.logp.shape[1])
        self.logp[rows] = aligned(logprob.detach().float(), cols, aligned_mask)
        self.entropy[rows] = aligned(entropy.detach().float(), cols, aligned_mask)
        self.mask[rows] = aligned_mask


def response_order(response_mask: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(``(N, width)`` column of each row's k-th response token, ``(N, width)`` bool mask of real entries).

    A stable sort puts the response columns first, in order; entries past the row's length point at
    some other column and are masked.
    """
    resp = response_mask.bool()
    order = torch.sort((~resp).to(torch.uint8), dim=1, stable=True).indices  # (N, K) response columns first
    k = min(width, order.shape[1])
    cols = torch.zeros(resp.shape[0], width, dtype=torch.long, device=resp.device)
    cols[:, :k] = order[:, :k]
    lengths = resp.sum(dim=1, keepdim=True)  # (N, 1)
    mask = torch.arange(width, device=resp.device).unsqueeze(0) < lengths  # (N, width)
    return cols, mask


def aligned(x: Tensor, cols: Tensor, mask: Tensor) -> Tensor:
    """``(N, K)`` column layout -> ``(N, width)`` response layout (0 where ``mask`` is False).

    ``torch.where``, not a product: a padding column may hold anything (inf times 0 is NaN).
    """
    return torch.where(mask, x.gather(1, cols), torch.zeros((), dtype=x.dtype, device=x.device))


def response_tokens(
    module: nn.Module,
    batch: RolloutBatch,
    temperature: float,
    width: int,
    params: dict[str, Tensor] | None = None,
) -> ResponseTokens:
    """``l_k`` and ``H_k`` of every response token of ``batch`` (``logprobs.token_terms``), ``(N, width)``.

    Differentiable in the model (or in ``params``, through ``functional_call``) by reverse and forward
    mode; ``width`` >= the longest response (the whole E batch's, so that microbatches line up).
    """
    t = token_terms(module, batch, temperature, params=params)  # (N, K) columns
    cols, mask = response_order(t.mask, width)
    return ResponseTokens(aligned(t.logprob, cols, mask), aligned(t.entropy, cols, mask), mask)


@torch.no_grad()
def response_tokens_at(
    module: nn.Module, params: dict[str, Tensor] | None, batch: RolloutBatch, temperature: float, units: int
) -> ResponseTokens:
    """``response_tokens`` of every row of ``batch`` (row order), ``units`` units per forward, no autograd."""
    out = ResponseTokens.zeros(batch)
    for mb in batch.microbatches(units):
        t = token_terms(module, mb.batch, temperature, params=params)
        out.put(mb.rows, t.logprob, t.entropy, t.mask)
    return out
