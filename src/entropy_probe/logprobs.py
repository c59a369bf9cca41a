"""Teacher-forced token log-probs of the policy ``softmax(logits / temperature)``.

Three details decide whether these numbers are right:
- position ids come from the attention mask, so a left-padded row sees the same positions as an
  unpadded one (GPT-2's learned position embeddings are wrong without them);
- log-softmax runs in fp32 whatever the model's dtype, so bf16 models give usable S_i;
- non-finite logits are an error naming the row, never a silent NaN downstream.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .batch import RolloutBatch, _first_bad_row
from .config import WEIGHTINGS, ProbeConfig  # noqa: F401  (the config owns the lists)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """0, 1, 2, ... over the real tokens of each row; padding gets 0 (it is masked anyway)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> tuple[frozenset, bool]:
    """(named parameters of ``cls.forward``, whether it takes ``**kwargs``), once per model class."""
    params = inspect.signature(cls.forward).parameters
    return frozenset(params), any(p.kind is p.VAR_KEYWORD for p in params.values())


def _accepts(model: nn.Module, name: str, via_kwargs: bool = True) -> bool:
    names, var_kw = _forward_parameters(type(model))
    return name in names or (via_kwargs and var_kw)


def model_logits(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    params: dict[str, Tensor] | None = None,
    keep_last: int | None = None,
) -> Tensor:
    """Call ``model(input_ids=..., attention_mask=...[, position_ids=...])`` and return ``(N, K, V)`` logits.

    K = T, or K = ``keep_last`` (the last positions only) when the model takes Hugging Face's
    ``logits_to_keep``: the LM head and the log-softmax then skip the prompt, often the costliest
    part for a large vocabulary. With ``params``, the call is ``torch.func.functional_call(model,
    params, ...)``: the parameters named there replace the module's own for this call only.
    """
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if _accepts(model, "position_ids"):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    if _accepts(model, "use_cache", False):
        kwargs["use_cache"] = False  # nothing reuses a KV cache; under checkpointing it would hold each K, V
    if keep_last is not None and keep_last < input_ids.shape[1] and _accepts(model, "logits_to_keep", False):
        kwargs["logits_to_keep"] = keep_last
    out = model(**kwargs) if params is None else torch.func.functional_call(model, params, (), kwargs)
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if logits is None:
        raise ValueError(
            f"model returned {type(out).__name__}; expected logits (N, T, V) or an object with .logits"
        )
    expected = {tuple(input_ids.shape), (input_ids.shape[0], kwargs.get("logits_to_keep", -1))}
    if logits.dim() != 3 or tuple(logits.shape[:2]) not in expected:
        raise ValueError(
            f"model logits have shape {tuple(logits.shape)}; expected (N, T, V) with "
            f"(N, T) = {tuple(input_ids.shape)}"
        )
    return logits


@dataclass
class SequenceLogProbs:
    """Per-sequence sums of response-token log-probs (all ``(N,)``, fp32).

    seq: S_i = sum_k m_ik l_ik, the sequence log-prob (what the policy gradient differentiates).
    weighted: S_w,i = sum_k w_ik l_ik, with w = m / L_i ("token-mean") or w = m ("sum").
    """

    seq: Tensor
    weighted: Tensor

    @classmethod
    def empty(cls, batch: RolloutBatch) -> "SequenceLogProbs":
        """``(N,)`` fp32 buffers for ``batch``'s rows, filled microbatch by microbatch with ``put``."""
        seq = torch.empty(batch.n_sequences, dtype=torch.float32, device=batch.device)
        return cls(seq, torch.empty_like(seq))

    def put(self, rows, lp: "SequenceLogProbs") -> None:
        """Write a microbatch's log-probs (detached) at its ``rows`` of the batch."""
        self.seq[rows], self.weighted[rows] = lp.seq.detach(), lp.weighted.detach()


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float) -> Tensor:
    """``(N, T)`` fp32 log-probs; entry t is ``log pi(input_ids[t] | <t)``, entry 0 is 0."""
    shifted = logits[:, :-1].float() / temperature  # (N, T-1, V): position t-1 predicts token t
    target = input_ids[:, 1:].unsqueeze(-1)  # (N, T-1, 1)
    # gather - logsumexp avoids materialising a second (N, T-1, V) log-softmax tensor.
    lp = shifted.gather(-1, target).squeeze(-1) - torch.logsumexp(shifted, dim=-1)  # (N, T-1)
    return torch.nn.functional.pad(lp, (1, 0))  # (N, T)


ENTROPY_VOCAB_CHUNK = 8192  # vocabulary columns per step of ``token_entropies``: 8192 * 4 B per position


def token_entropies(logits: Tensor, temperature: float, vocab_chunk: int = ENTROPY_VOCAB_CHUNK) -> Tensor:
    """``(N, T)`` fp32 full-vocabulary entropies; entry t is ``H_t = -sum_a p(a|<t) log p(a|<t)`` of the
    distribution ``softmax(logits[t-1] / temperature)`` that generated token t (aligned with
    ``token_logprobs``), entry 0 is 0. Differentiable (pathwise) in the logits by reverse and forward mode.

    The vocabulary is walked in chunks of ``vocab_chunk`` columns, each cast to fp32 on its own, so no
    (N, T, V) fp32 copy is ever made: one pass for the log-normaliser, one for
    ``H = sum_a p_a (lse - z_a)`` (every term >= 0, no cancellation). Under reverse mode each chunk's
    term is recomputed in the backward (``torch.utils.checkpoint``), so the saved activations stay
    at the size of one chunk plus the (bf16/fp32) logits the model already holds.
    """
    return _normalised_terms(logits, None, temperature, vocab_chunk)[1]


def token_logprobs_and_entropies(
    logits: Tensor, input_ids: Tensor, temperature: float, vocab_chunk: int = ENTROPY_VOCAB_CHUNK
) -> tuple[Tensor, Tensor]:
    """``(token_logprobs, token_entropies)`` of the same logits, ``(N, T)`` fp32 each, from one log-normaliser
    (the two functions would each walk the vocabulary for it). Equal to them: the same ops per element,
    bit for bit while the vocabulary fits one chunk."""
    return _normalised_terms(logits, input_ids, temperature, vocab_chunk)


def _normalised_terms(logits: Tensor, input_ids: Tensor | None, temperature: float, vocab_chunk: int):
    """``(l_t or None, H_t)``, ``(N, T)`` each (entry 0 is 0), from one chunked log-normaliser."""
    z = logits[:, :-1]  # (N, T-1, V): position t-1 predicts token t
    bounds = [(lo, min(lo + vocab_chunk, z.shape[-1])) for lo in range(0, z.shape[-1], vocab_chunk)]
    recompute = torch.is_grad_enabled() and logits.requires_grad

    def run(fn, *args):  # under reverse mode the chunk's fp32 intermediates are recomputed, not kept
        return checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)

    lse = torch.stack([run(_chunk_lse, z[..., lo:hi], temperature) for lo, hi in bounds], dim=-1)
    lse = torch.logsumexp(lse, dim=-1)  # (N, T-1, n_chunks) -> (N, T-1)
    h = torch.zeros_like(lse)
    for lo, hi in bounds:
        h = h + run(_entropy_chunk, z[..., lo:hi], lse, temperature)
    lp = None
    if input_ids is not None:  # gather - the normaliser, as token_logprobs
        lp = z.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1).float() / temperature - lse  # (N, T-1)
        lp = torch.nn.functional.pad(lp, (1, 0))
    return lp, torch.nn.functional.pad(h, (1, 0))  # (N, T) each


def _chunk_lse(z: Tensor, temperature: float) -> Tensor:
    """``logsumexp_{a in chunk} z_a / temperature`` per position, fp32."""
    return torch.logsumexp(z.float() / temperature, dim=-1)  # (N, T-1)


def _entropy_chunk(z: Tensor, lse: Tensor, temperature: float) -> Tensor:
    """``sum_{a in chunk} p_a (lse - z_a)`` per position, fp32: one chunk's share of H."""
    gap = lse.unsqueeze(-1) - z.float() / temperature  # (N, T-1, chunk): -log p_a >= 0
    return (torch.exp(-gap) * gap).sum(dim=-1)  # (N, T-1)


def response_weights(response_mask: Tensor, weighting: str) -> Tensor:
    """``(N, T)`` fp32 weights w_ik of S_w (docs/design.md section 2)."""
    m = response_mask.float()
    if weighting == "token-mean":
        return m / m.sum(dim=1, keepdim=True)
    if weighting == "sum":
        return m
    raise ValueError(f"entropy_weighting must be one of {WEIGHTINGS}, got {weighting!r}")


class NonFiniteLogits(ValueError):
    """The model's logits hold NaN or inf at a real token (the message names the unit and response)."""


def _response_logits(
    model: nn.Module, batch: RolloutBatch, params: dict[str, Tensor] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits (N, K, V), ids (N, K), response mask (N, K))``: the last K positions, from the column before
    the batch's earliest response token on (none before is needed); non-finite logits at a real token are
    an error naming the unit."""
    ids, attn, resp = batch.input_ids, batch.attention_mask, batch.response_mask
    first = int(resp.to(torch.uint8).argmax(dim=1).min())  # earliest response column of the batch (>= 1)
    logits = model_logits(model, ids, attn, params, keep_last=ids.shape[1] - first + 1)  # (N, K, V)
    offset = ids.shape[1] - logits.shape[1]  # logits cover positions offset..T-1
    ids, attn, resp = ids[:, offset:], attn[:, offset:], resp[:, offset:]  # (N, K)
    finite = torch.isfinite(logits.detach()).all(dim=-1) | ~attn.bool()  # (N, K); padding may hold anything
    if not finite.all():
        row = _first_bad_row(~finite)
        # ``batch`` may be a microbatch of whole units: name the unit and the response's place in it,
        # which are the same in the caller's batch (units keep their row order), not the row here.
        group = int(batch.group_ids[row])
        within = int((batch.group_ids[:row] == group).sum())
        raise NonFiniteLogits(
            f"model logits are not finite for response {within} of unit {group} (group id; "
            "responses counted from 0 in batch order): NaN or inf at a real token"
        )
    return logits, ids, resp


def sequence_logprobs(
    model: nn.Module,
    batch: RolloutBatch,
    temperature: float,
    weighting: str,
    params: dict[str, Tensor] | None = None,
) -> SequenceLogProbs:
    """Teacher-forced S_i and S_w,i of every sequence, differentiable in the model (or in ``params``)."""
    logits, ids, resp = _response_logits(model, batch, params)
    # where, not multiply: padding logits may be inf and 0 * inf is NaN.
    lp = torch.where(resp.bool(), token_logprobs(logits, ids, temperature), 0.0)  # (N, K)
    w = response_weights(resp, weighting)
    return SequenceLogProbs(seq=lp.sum(dim=1), weighted=(lp * w).sum(dim=1))


@dataclass
class TokenTerms:
    """Per response token, ``(N, K)`` fp32 over the last K columns of the batch (those holding a response
    token or the column before one), 0 outside the response.

    entropy: H_t, the full-vocabulary entropy of the distribution that generated token t;
    logprob: l_t = log pi(token t | <t); mask: the response mask m_t (float).
    """

    entropy: Tensor
    logprob: Tensor
    mask: Tensor


def token_terms(
    model: nn.Module, batch: RolloutBatch, temperature: float, params: dict[str, Tensor] | None = None
) -> TokenTerms:
    """H_t and l_t of every response token, differentiable in the model (or in ``params``)."""
    logits, ids, resp = _response_logits(model, batch, params)
    real = resp.bool()
    lp, h = token_logprobs_and_entropies(logits, ids, temperature)  # (N, K) each, one normaliser
    lp, h = torch.where(real, lp, 0.0), torch.where(real, h, 0.0)
    return TokenTerms(entropy=h, logprob=lp, mask=resp.float())


def policy_logprobs(
    module: nn.Module, batch: RolloutBatch, cfg: ProbeConfig, params: dict[str, Tensor] | None = None
) -> SequenceLogProbs:
    """``sequence_logprobs`` of the policy the probe differentiates: ``cfg``'s temperature, weighting."""
    return sequence_logprobs(module, batch, cfg.temperature, cfg.entropy_weighting, params=params)


@torch.no_grad()
def logprobs_at(
    module: nn.Module, params: dict[str, Tensor] | None, batch: RolloutBatch, cfg: ProbeConfig
) -> SequenceLogProbs:
    """``S_i`` and ``S_w,i`` of every sequence, ``(N,)`` fp32 in row order, under the given parameters
    (None: the module's own, a plain forward)."""
    out = SequenceLogProbs.empty(batch)
    for mb in batch.microbatches(cfg.microbatch_units):
        out.put(mb.rows, policy_logprobs(module, mb.batch, cfg, params))
    return out
