"""Sample G responses per prompt from the policy and return them as a ``RolloutBatch``.

    from entropy_probe.sampling import sample_rollouts
    batch = sample_rollouts(model, prompts=[[5, 3, 9], [2, 7]], group_size=4, max_new_tokens=6,
                            eos_token_id=11, reward_fn=lambda prompt, response: float(len(response)),
                            temperature=1.0, seed=0)

The sampling distribution is exactly the probe's policy ``softmax(logits / temperature)``:
- a Hugging Face causal LM (``transformers.GenerationMixin``) samples through ``model.generate``
  with its KV cache, ``do_sample=True``, ``top_k=0``, ``top_p=1.0`` and nothing else that would
  reshape the distribution (an explicit ``GenerationConfig``, so the model's defaults do not leak in);
- any other module samples through a plain autoregressive loop that calls ``logprobs.model_logits``
  on the whole sequence each step (no cache), so it sees the positions the probe sees.

Layout of the batch (N = len(prompts) * group_size rows, T = longest prompt + longest response):
prompts left-padded, response right after the prompt, up to and including the first EOS, then
padding with attention 0. ``group_ids`` is the prompt's index in ``prompts``; rows of one prompt
are adjacent.

The reward function is ``reward_fn(prompt: tuple[int, ...], response: tuple[int, ...]) -> float``:
the prompt's tokens and the response's tokens, the terminating EOS included when the response has
one (a response without EOS was cut at ``max_new_tokens``). ``toy.default_reward`` has this form.

Seeded: the same seed gives the same batch, and the caller's RNG streams and train/eval mode are
untouched (``torch.random.fork_rng`` and ``caller_state.preserved_caller_state``; sampling runs
in eval mode, the mode the probe evaluates in).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .batch import RolloutBatch
from .caller_state import preserved_caller_state
from .distributed import unwrap
from .logprobs import model_logits

RewardFn = Callable[[tuple, tuple], float]


def sample_rollouts(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    group_size: int,
    max_new_tokens: int,
    eos_token_id: int,
    reward_fn: RewardFn | None,
    temperature: float = 1.0,
    seed: int = 0,
    pad_token_id: int | None = None,
) -> RolloutBatch:
    """``group_size`` sampled responses for each prompt, scored by ``reward_fn``, as a ``RolloutBatch``.

    reward_fn: None for an evaluation batch (E needs no rewards): the batch then carries none.

    pad_token_id: the id written at padding positions (attention 0); default ``eos_token_id``.
    """
    prompts = _check_inputs(prompts, group_size, max_new_tokens, eos_token_id, temperature)
    pad = eos_token_id if pad_token_id is None else int(pad_token_id)
    module = unwrap(model)
    device = next(module.parameters()).device
    ids, attn = left_pad(prompts, pad, device)  # (P, Tp) each
    ids = ids.repeat_interleave(group_size, dim=0)  # (N, Tp): rows of one prompt adjacent
    attn = attn.repeat_interleave(group_size, dim=0)
    cuda = [device.index or 0] if device.type == "cuda" else []
    caller = preserved_caller_state(module, keep_checkpointing=False, warn_dropout=False)
    with torch.random.fork_rng(devices=cuda), caller, torch.no_grad():
        torch.manual_seed(seed)
        if _is_hf_generator(module):
            out = _generate_hf(module, ids, attn, Sampling(max_new_tokens, eos_token_id, pad, temperature))
        else:
            out = _generate_loop(module, ids, attn, Sampling(max_new_tokens, eos_token_id, pad, temperature))
    response = out[:, ids.shape[1] :]  # (N, L)
    resp_mask = response_mask_until_eos(response, eos_token_id)  # (N, L)
    response = torch.where(resp_mask.bool(), response, pad)
    input_ids = torch.cat([ids, response], dim=1)  # (N, Tp + L)
    attention = torch.cat([attn, resp_mask], dim=1)
    response_mask = torch.cat([torch.zeros_like(attn), resp_mask], dim=1)
    group_ids = torch.arange(len(prompts), device=device).repeat_interleave(group_size)  # (N,)
    rewards = (
        None if reward_fn is None else score(prompts, group_size, response, resp_mask, reward_fn).to(device)
    )
    return RolloutBatch(input_ids, attention, response_mask, group_ids, rewards=rewards)


def left_pad(prompts: list[tuple[int, ...]], pad_token_id: int, device) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, each ``(P, longest prompt)``, padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attn[row, width - len(p) :] = 1
    return ids.to(device), attn.to(device)


def response_mask_until_eos(response: Tensor, eos_token_id: int) -> Tensor:
    """``(N, L)`` 1 up to and including the first EOS of each row (all L when a row has none)."""
    is_eos = (response == eos_token_id).long()  # (N, L)
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()


def score(
    prompts: list[tuple[int, ...]], group_size: int, response: Tensor, resp_mask: Tensor, reward_fn: RewardFn
) -> Tensor:
    """``(N,)`` float32 rewards; a raising or non-finite reward_fn is a ValueError naming the row."""
    rewards = []
    lengths = resp_mask.sum(dim=1).tolist()
    for row, tokens in enumerate(response.tolist()):
        prompt, resp = prompts[row // group_size], tuple(tokens[: lengths[row]])
        try:
            r = float(reward_fn(prompt, resp))
        except Exception as exc:  # noqa: BLE001 (re-raised with the row named)
            raise ValueError(
                f"reward_fn raised {type(exc).__name__} ({exc}) on row {row} "
                f"(prompt {row // group_size} {list(prompt)}, response {list(resp)})"
            ) from exc
        if not math.isfinite(r):
            raise ValueError(
                f"reward_fn returned {r} on row {row} (prompt {row // group_size} {list(prompt)}, "
                f"response {list(resp)}); rewards must be finite"
            )
        rewards.append(r)
    return torch.tensor(rewards, dtype=torch.float32)


def _is_hf_generator(module: nn.Module) -> bool:
    if not hasattr(module, "generate"):
        return False
    try:
        from transformers import GenerationMixin
    except ImportError:
        return False
    return isinstance(module, GenerationMixin)


class Sampling(NamedTuple):
    """How responses are sampled: at most ``max_new_tokens``, ending at ``eos``, padded with ``pad``."""

    max_new_tokens: int
    eos: int
    pad: int
    temperature: float


def _generate_hf(module, ids: Tensor, attn: Tensor, how: Sampling) -> Tensor:
    """``(N, Tp + L)`` prompt and sampled tokens from ``generate`` (KV cache, pure sampling)."""
    config = pure_sampling_config(how.max_new_tokens, how.eos, how.pad, how.temperature)
    # generate() fills every field left None from model.generation_config (a Hub model's may carry
    # top_p, suppress_tokens, no_repeat_ngram_size, ...). A blank one for the call lets only the
    # neutral global defaults in; the model's own is put back afterwards.
    from transformers import GenerationConfig

    saved = module.generation_config
    module.generation_config = GenerationConfig()
    try:
        return module.generate(input_ids=ids, attention_mask=attn, generation_config=config)
    finally:
        module.generation_config = saved


def pure_sampling_config(max_new_tokens: int, eos: int, pad: int, temperature: float, **extra):
    """A ``GenerationConfig`` that samples exactly from ``softmax(logits / temperature)``.

    top_k=0 and top_p=1.0 switch off truncation (the global default top_k is 50); no repetition
    penalty, no minimum length, one beam. ``extra``: further fields (tests ask for ``output_scores``).
    Fields left None are filled from ``model.generation_config`` by ``generate``; ``_generate_hf``
    blanks that for the call.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        repetition_penalty=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
        use_cache=True,
        **extra,
    )


def _generate_loop(module, ids: Tensor, attn: Tensor, how: Sampling) -> Tensor:
    """``(N, Tp + L)`` by a plain loop: full forward each step, sample from the last position."""
    max_new_tokens, eos, pad, temperature = how
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = model_logits(module, ids, attn)[:, -1].float() / temperature  # (N, V)
        nxt = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)  # (N,)
        nxt = torch.where(done, pad, nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        attn = torch.cat([attn, (~done).long()[:, None]], dim=1)
        done = done | (nxt == eos)
        if done.all():
            break
    return ids


def _check_inputs(prompts, group_size, max_new_tokens, eos_token_id, temperature) -> list[tuple[int, ...]]:
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(
            f"sample_rollouts: group_size must be an integer >= 2 (a unit needs 2 responses), "
            f"got {group_size!r}"
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"sample_rollouts: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(eos_token_id, int) or eos_token_id < 0:
        raise ValueError(f"sample_rollouts: eos_token_id must be an integer >= 0, got {eos_token_id!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"sample_rollouts: temperature must be a finite number > 0, got {temperature!r}")
    prompts = [tuple(int(t) for t in p) for p in prompts]
    if not prompts:
        raise ValueError("sample_rollouts: prompts is empty; give at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(
                f"sample_rollouts: prompts[{i}] is empty; a response needs a prompt token before it"
            )
        if min(p) < 0:
            raise ValueError(f"sample_rollouts: prompts[{i}] holds a negative token id {min(p)}")
    return prompts
