"""An exactly enumerable problem: a tabular policy whose every response can be listed.

Vocabulary {EOS=0, a=1, b=2}; prompts are short strings over {a, b} (different lengths, so batches
are left-padded); a response ends at EOS or after ``max_len`` tokens. With V = 3 and max_len = 3
there are 1 + 2 + 4 * 3 = 15 responses per prompt, so the entropy

    H(theta) = mean_x sum_y pi(y | x) * (-S_w(y))

and its gradient (autograd through the sum) are exact. Tests and ``entropy-probe validate`` measure
the probe's estimators against them.

>>> import torch
>>> policy = TabularPolicy(seed=0)
>>> resp = enumerate_responses(policy)
>>> p = torch.exp(resp.seq_logprobs(policy)).reshape(len(policy.prompts), -1).sum(dim=1)
>>> torch.allclose(p, torch.ones_like(p))   # a proper distribution per prompt
True
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Callable

import torch
from torch import Tensor, nn

from .batch import RolloutBatch
from .logprobs import position_ids_from_mask, sequence_logprobs

EOS, A, B = 0, 1, 2
DEFAULT_PROMPTS = ((A,), (B,), (A, B), (B, B, A))


class TabularPolicy(nn.Module):
    """``logits[t] = table[position_t, token_{t-1}, token_t]``: autoregressive, tiny, exact.

    Called like a Hugging Face causal LM: ``model(input_ids, attention_mask, position_ids)`` -> logits.
    """

    def __init__(
        self,
        vocab_size: int = 3,
        max_len: int = 3,
        prompts=DEFAULT_PROMPTS,
        scale: float = 1.0,
        seed: int = 0,
    ):
        super().__init__()
        self.vocab_size, self.max_len = vocab_size, max_len
        self.prompts = tuple(tuple(p) for p in prompts)
        self.max_positions = max(len(p) for p in self.prompts) + max_len
        gen = torch.Generator().manual_seed(seed)
        # (positions, previous token or "none", current token, next-token logits)
        self.table = nn.Parameter(
            scale * torch.randn(self.max_positions, vocab_size + 1, vocab_size, vocab_size, generator=gen)
        )

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        real = attention_mask.bool()
        prev = torch.nn.functional.pad(input_ids[:, :-1], (1, 0), value=self.vocab_size)  # (N, T)
        prev_real = torch.nn.functional.pad(real[:, :-1], (1, 0), value=False)
        prev = torch.where(prev_real, prev, self.vocab_size)  # "none" before the first real token
        pos = position_ids.clamp(0, self.max_positions - 1)
        return self.table[pos, prev, input_ids.clamp(0, self.vocab_size - 1)]  # (N, T, V)


@dataclass
class EnumeratedResponses:
    """Every (prompt, response) pair, one row each, prompts in order, responses in a fixed order."""

    input_ids: Tensor  # (P * R, T)
    attention_mask: Tensor
    response_mask: Tensor
    prompt_index: Tensor  # (P * R,)
    responses: list[tuple[int, ...]]  # the R responses

    def batch(self, rows: Tensor | None = None, rewards: Tensor | None = None) -> RolloutBatch:
        sel = slice(None) if rows is None else rows
        n = self.input_ids[sel].shape[0]
        return RolloutBatch(
            self.input_ids[sel],
            self.attention_mask[sel],
            self.response_mask[sel],
            self.prompt_index[sel],
            rewards=torch.zeros(n) if rewards is None else rewards,
        )

    def seq_logprobs(self, policy: nn.Module, temperature: float = 1.0) -> Tensor:
        return sequence_logprobs(policy, self.batch(), temperature, "sum").seq


def all_responses(vocab_size: int, max_len: int) -> list[tuple[int, ...]]:
    """Token strings ending at the first EOS, or cut at max_len."""
    out = []
    for length in range(1, max_len + 1):
        for toks in product(range(vocab_size), repeat=length):
            if EOS in toks[:-1]:
                continue  # EOS ends a response
            if length < max_len and toks[-1] != EOS:
                continue  # shorter than max_len only when it ends with EOS
            out.append(toks)
    return out


def enumerate_responses(policy: TabularPolicy) -> EnumeratedResponses:
    responses = all_responses(policy.vocab_size, policy.max_len)
    width = max(len(p) for p in policy.prompts) + policy.max_len
    rows, attn, resp, pidx = [], [], [], []
    for pi, prompt in enumerate(policy.prompts):
        for r in responses:
            seq = list(prompt) + list(r)
            pad = width - len(seq)
            rows.append([EOS] * pad + seq)  # left padding
            attn.append([0] * pad + [1] * len(seq))
            resp.append([0] * (pad + len(prompt)) + [1] * len(r))
            pidx.append(pi)
    t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return EnumeratedResponses(t(rows), t(attn), t(resp), t(pidx), responses)


def exact_entropy(policy: TabularPolicy, weighting: str = "token-mean", temperature: float = 1.0) -> Tensor:
    """``H(theta) = mean_x sum_y pi(y|x) (-S_w(y))``, differentiable in the policy's parameters."""
    resp = enumerate_responses(policy)
    lp = sequence_logprobs(policy, resp.batch(), temperature, weighting)
    per_row = torch.exp(lp.seq) * -lp.weighted  # (P * R,)
    return per_row.reshape(len(policy.prompts), -1).sum(dim=1).mean()


def exact_entropy_f64(
    policy: TabularPolicy, table: Tensor | None = None, weighting: str = "token-mean"
) -> Tensor:
    """``H`` by enumeration entirely in float64 (``exact_entropy`` log-softmaxes in fp32, whose rounding,
    ~1e-7 nats, hides the O(eta^3) error of a second-order forecast at small steps).

    ``table``: the policy's parameter to use instead of its own (e.g. ``theta + step * v``), differentiable.
    """
    resp = enumerate_responses(policy)
    table = (policy.table if table is None else table).double()
    logits = torch.func.functional_call(
        policy, {"table": table}, (resp.input_ids, resp.attention_mask)
    )  # (R, T, V)
    logp = (
        torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, resp.input_ids[:, 1:, None]).squeeze(-1)
    )  # (R, T-1)
    m = resp.response_mask[:, 1:].double()
    w = m / m.sum(dim=1, keepdim=True) if weighting == "token-mean" else m
    seq, weighted = (logp * m).sum(dim=1), (logp * w).sum(dim=1)
    return (torch.exp(seq) * -weighted).reshape(len(policy.prompts), -1).sum(dim=1).mean()


def exact_token_entropy(
    policy: TabularPolicy, table: Tensor | None = None, temperature: float = 1.0
) -> Tensor:
    """The trainers' token-level entropy ``E_x E_y[sum_t m_t H_t] / E_x E_y[sum_t m_t]`` by enumeration,
    float64, with H_t the full-vocabulary entropy of softmax(logits / temperature) written out here.

    ``table``: the policy's parameter to use instead of its own, differentiable.
    """
    resp = enumerate_responses(policy)
    table = (policy.table if table is None else table).double()
    logits = torch.func.functional_call(policy, {"table": table}, (resp.input_ids, resp.attention_mask))
    logp_all = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)  # (R, T-1, V)
    logp = logp_all.gather(-1, resp.input_ids[:, 1:, None]).squeeze(-1)  # (R, T-1)
    h = -(logp_all.exp() * logp_all).sum(-1)  # (R, T-1) H_t of the distribution that drew token t
    m = resp.response_mask[:, 1:].double()
    prob = torch.exp((logp * m).sum(dim=1))  # (R,) pi(y|x)
    per_prompt = lambda x: (prob * x).reshape(len(policy.prompts), -1).sum(dim=1).mean()  # noqa: E731
    return per_prompt((h * m).sum(dim=1)) / per_prompt(m.sum(dim=1))


def exact_token_derivative(policy: TabularPolicy, v: dict[str, Tensor], temperature: float = 1.0) -> float:
    """``grad H_tok . v`` in float64, by autograd through ``exact_token_entropy``."""
    table = policy.table.detach().double().requires_grad_(True)
    (grad,) = torch.autograd.grad(exact_token_entropy(policy, table, temperature), table)
    return float((grad * v["table"].double()).sum())


def exact_token_second_derivative(
    policy: TabularPolicy, v: dict[str, Tensor], temperature: float = 1.0
) -> float:
    """``v^T (grad^2 H_tok) v`` in float64, by double backward through ``exact_token_entropy``."""
    table = policy.table.detach().double().requires_grad_(True)
    direction = v["table"].double()
    (grad,) = torch.autograd.grad(exact_token_entropy(policy, table, temperature), table, create_graph=True)
    (hess_v,) = torch.autograd.grad((grad * direction).sum(), table)
    return float((hess_v * direction).sum())


def exact_directional_derivatives(
    policy: TabularPolicy, v: dict[str, Tensor], weighting: str = "token-mean"
) -> tuple[float, float]:
    """``(grad H . v, v^T (grad^2 H) v)`` in float64, by double backward through ``exact_entropy_f64``."""
    table = policy.table.detach().double().requires_grad_(True)
    direction = v["table"].double()
    (grad,) = torch.autograd.grad(exact_entropy_f64(policy, table, weighting), table, create_graph=True)
    first = (grad * direction).sum()
    (hess_v,) = torch.autograd.grad(first, table)
    return float(first.detach()), float((hess_v * direction).sum())


def exact_directional_derivative(
    policy: TabularPolicy, v: dict[str, Tensor], weighting: str = "token-mean", temperature: float = 1.0
) -> float:
    """``grad H(theta) . v`` by autograd through the enumerated entropy."""
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(exact_entropy(policy, weighting, temperature), list(params.values()))
    return float(sum((g.double() * v[n].double()).sum() for n, g in zip(params, grads)))


def default_reward(prompt: tuple[int, ...], response: tuple[int, ...]) -> float:
    """Reward the responses that echo the prompt's first token then stop: a learnable, graded target."""
    body = [t for t in response if t != EOS]
    return float(sum(t == prompt[0] for t in body)) / max(len(body), 1) + 0.5 * float(response[-1] == EOS)


def sample_enumerated(
    policy: TabularPolicy,
    n_units: int,
    group_size: int = 4,
    seed: int = 0,
    temperature: float = 1.0,
    reward_fn: Callable[[tuple, tuple], float] = default_reward,
) -> RolloutBatch:
    """Exact samples: prompts uniformly, G responses each from the enumerated pi(y|x). Seeded, RNG-neutral."""
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    resp = enumerate_responses(policy)
    n_resp = len(resp.responses)
    with torch.no_grad():
        probs = torch.exp(resp.seq_logprobs(policy, temperature)).reshape(
            len(policy.prompts), n_resp
        )  # (P, R)
    gen = torch.Generator().manual_seed(seed)
    prompt_of_unit = torch.randint(len(policy.prompts), (n_units,), generator=gen)
    draws = torch.multinomial(probs[prompt_of_unit], group_size, replacement=True, generator=gen)  # (B, G)
    rows = (prompt_of_unit[:, None] * n_resp + draws).reshape(-1)  # (B * G,)
    rewards = torch.tensor(
        [
            reward_fn(policy.prompts[int(prompt_of_unit[u])], resp.responses[int(d)])
            for u in range(n_units)
            for d in draws[u]
        ],
        dtype=torch.float32,
    )
    b = resp.batch(rows, rewards)
    return RolloutBatch(
        b.input_ids,
        b.attention_mask,
        b.response_mask,
        torch.arange(n_units).repeat_interleave(group_size),
        rewards=rewards,
    )


class EnumerableGPT2(nn.Module):
    """A real ``GPT2LMHeadModel`` (2 layers, width 16) with the tabular policy's vocabulary {EOS, a, b},
    prompts and ``max_len``, so that the functions above enumerate it exactly (15 responses a prompt).

    Dropout is off (the enumerated entropy is then a function of the weights). ``init``: the weights'
    initializer range; 0.3 gives a peaked policy, GPT-2's own 0.02 a nearly uniform one."""

    def __init__(self, seed: int = 0, init: float = 0.3):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.vocab_size, self.max_len, self.prompts = 3, 3, DEFAULT_PROMPTS
        config = GPT2Config(
            vocab_size=3,
            n_positions=8,
            n_embd=16,
            n_layer=2,
            n_head=2,
            initializer_range=init,  # 0.3: a peaked policy (0.02, GPT-2's own, is nearly uniform)
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.gpt = GPT2LMHeadModel(config)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        out = self.gpt(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.logits
