"""Second methods the core tests measure the probe against (imported by tests/test_core_*.py).

Nothing here calls the core's log-prob, objective or direction code: every quantity is written out
by hand (log_softmax + gather, per-sequence backward passes, numpy), so that agreement with the
probe is evidence, not a tautology. Only ``RolloutBatch`` (a container) is shared.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from entropy_probe import RolloutBatch


# ---- models ----------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    """A plain causal LM: token + position embeddings, a causal running mean, a 2-layer head.

    Called like a Hugging Face model, returns raw ``(N, T, V)`` logits. Dropout is there so that
    train/eval mode matters (tests check the probe runs in eval mode and restores the caller's mode).
    """

    def __init__(self, vocab: int = 7, dim: int = 8, max_pos: int = 16, dropout: float = 0.0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tok = nn.Parameter(0.5 * torch.randn(vocab, dim, generator=gen))
        self.pos = nn.Parameter(0.5 * torch.randn(max_pos, dim, generator=gen))
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        with torch.no_grad():
            for p in (*self.hidden.parameters(), *self.head.parameters()):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        if position_ids is None:
            position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
        h = self.tok[input_ids] + self.pos[position_ids]  # (N, T, D)
        m = attention_mask.unsqueeze(-1).float()  # (N, T, 1)
        # causal running mean over real tokens: position t sees tokens <= t only
        ctx = (h * m).cumsum(1) / m.cumsum(1).clamp_min(1.0)  # (N, T, D)
        return self.head(self.drop(torch.tanh(self.hidden(ctx) + h)))  # (N, T, V)


def tiny_gpt2(seed: int = 0, vocab: int = 11, dropout: float = 0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def tiny_llama(seed: int = 0, vocab: int = 11):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg)


# ---- batches ---------------------------------------------------------------------------------------
def random_batch(
    n_units: int,
    group_size: int | list[int] = 3,
    vocab: int = 7,
    seed: int = 0,
    side: str = "left",
    max_prompt: int = 3,
    max_response: int = 4,
    advantages: bool = False,
) -> RolloutBatch:
    """Units of random prompts (one per unit) and responses of random lengths, padded on ``side``.

    Rewards are random in {0, 0.5, 1} (ties within a unit happen), or advantages N(0, 1).
    """
    gen = np.random.default_rng(seed)
    sizes = [group_size] * n_units if isinstance(group_size, int) else list(group_size)
    seqs, resp_starts, gids = [], [], []
    for u, g in enumerate(sizes):
        prompt = list(gen.integers(1, vocab, size=gen.integers(1, max_prompt + 1)))
        for _ in range(g):
            response = list(gen.integers(0, vocab, size=gen.integers(1, max_response + 1)))
            seqs.append(prompt + response)
            resp_starts.append(len(prompt))
            gids.append(100 + 7 * u)  # group ids that are not 0..B-1
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids)
    for i, (s, r0) in enumerate(zip(seqs, resp_starts)):
        pad = width - len(s)
        off = pad if side == "left" else 0
        ids[i, off : off + len(s)] = torch.tensor(s)
        attn[i, off : off + len(s)] = 1
        resp[i, off + r0 : off + len(s)] = 1
    n = len(seqs)
    if advantages:
        return RolloutBatch(
            ids,
            attn,
            resp,
            torch.tensor(gids),
            advantages=torch.tensor(gen.normal(size=n), dtype=torch.float32),
        )
    rewards = torch.tensor(gen.integers(0, 3, size=n) / 2.0, dtype=torch.float32)
    return RolloutBatch(ids, attn, resp, torch.tensor(gids), rewards=rewards)


def units_of(batch: RolloutBatch) -> list[list[int]]:
    """Row indices of each unit, units in order of first appearance (computed by hand)."""
    order: dict[int, list[int]] = {}
    for i, g in enumerate(batch.group_ids.tolist()):
        order.setdefault(g, []).append(i)
    return list(order.values())


# ---- log-probs by hand ------------------------------------------------------------------------------
def hand_token_logprobs(model: nn.Module, batch: RolloutBatch, temperature: float = 1.0) -> Tensor:
    """``(N, T)`` fp32 log pi(token_t | <t) at response positions, 0 elsewhere (log_softmax + gather)."""
    ids, attn = batch.input_ids, batch.attention_mask
    pos = torch.zeros_like(ids)
    for i in range(ids.shape[0]):  # positions 0, 1, ... over the real tokens of each row
        real = attn[i].nonzero().flatten()
        pos[i, real] = torch.arange(len(real))
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos)
    logits = out if isinstance(out, Tensor) else out.logits
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, T, V)
    rows, cols = batch.response_mask.nonzero(as_tuple=True)  # response token (i, t): read logits at t - 1
    lp = torch.zeros(ids.shape, dtype=torch.float32)
    lp = lp.index_put((rows, cols), logp[rows, cols - 1, ids[rows, cols]])  # (N, T)
    return lp


def hand_sequence_logprobs(model, batch, temperature=1.0, weighting="token-mean"):
    """``(S, S_w)`` each ``(N,)``, differentiable."""
    lp = hand_token_logprobs(model, batch, temperature)
    m = batch.response_mask.float()
    seq = lp.sum(1)
    if weighting == "sum":
        return seq, seq
    return seq, (lp * m).sum(1) / m.sum(1)


def hand_entropy_change(batch: RolloutBatch, s0, w0, s1, w1) -> float:
    """The truth's change on E written out unit by unit (numpy): importance weights exp(S' - S) with
    the leave-one-out mean of h = -S_w(theta) as the control variate, averaged over units."""
    s0, w0, s1, w1 = (np.asarray(x, dtype=np.float64) for x in (s0, w0, s1, w1))
    changes = []
    for rows in units_of(batch):
        total = 0.0
        for i in rows:
            baseline = np.mean([-w0[j] for j in rows if j != i])
            weight = np.exp(s1[i] - s0[i])
            total += weight * (-w1[i] - baseline) - (-w0[i] - baseline)
        changes.append(total / len(rows))
    return float(np.mean(changes))


# ---- advantages and losses by hand (numpy) ---------------------------------------------------------
def numpy_advantages(batch: RolloutBatch, estimator: str) -> np.ndarray:
    r = batch.rewards.double().numpy() if batch.rewards is not None else None
    if estimator == "given":
        return batch.advantages.double().numpy()
    out = np.zeros(batch.n_sequences)
    for rows in units_of(batch):
        x = r[rows]
        g = len(rows)
        if estimator == "dr-grpo":
            out[rows] = x - x.mean()
        elif estimator == "rloo":
            out[rows] = [x[i] - np.delete(x, i).mean() for i in range(g)]
        elif estimator == "grpo":
            out[rows] = (x - x.mean()) / (x.std(ddof=1) + 1e-4)  # TRL 1.16: std (Bessel) + 1e-4
        else:
            raise AssertionError(estimator)
    return out


def hand_objective(
    seq_token_lp: Tensor,
    batch: RolloutBatch,
    adv: np.ndarray,
    aggregation: str,
    norm_length: int | None = None,
) -> Tensor:
    """J_U (ascent) of the loss aggregation, from ``(N, T)`` token log-probs: the loss is ``-J_U``.

    Written as each RL library writes its loss (TRL/verl), per token with the response mask.
    """
    m = batch.response_mask.float()
    a = torch.tensor(adv, dtype=torch.float32)[:, None]  # (N, 1)
    per_tok = a * seq_token_lp * m  # (N, T)
    n = batch.n_sequences
    if aggregation == "seq-mean-token-mean":  # GRPO: mean over sequences of per-sequence token means
        return (per_tok.sum(1) / m.sum(1)).mean()
    if aggregation == "seq-mean-token-sum":
        return per_tok.sum(1).mean()
    if aggregation == "token-mean":  # DAPO: one mean over all response tokens of the batch
        return per_tok.sum() / m.sum()
    if aggregation == "seq-mean-token-sum-norm":  # Dr. GRPO (TRL dr_grpo): over N * max_completion_length
        return per_tok.sum() / (n * norm_length)
    raise AssertionError(aggregation)


# ---- per-sequence gradients and the brute-force X_n, Y_m -----------------------------------------
def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def flat_grad(scalar: Tensor, params: dict[str, nn.Parameter]) -> np.ndarray:
    """``d scalar / d params`` flattened in named_parameters order, float64 (zeros where unused)."""
    gs = torch.autograd.grad(scalar, list(params.values()), retain_graph=True, allow_unused=True)
    return np.concatenate(
        [
            (torch.zeros_like(p) if g is None else g).double().reshape(-1).numpy()
            for g, p in zip(gs, params.values())
        ]
    )  # (P,)


def flat(vec: dict[str, Tensor], params: dict[str, nn.Parameter]) -> np.ndarray:
    return np.concatenate([vec[n].double().reshape(-1).numpy() for n in params])  # (P,)


def per_sequence_grads(model, batch, temperature=1.0, weighting="token-mean"):
    """``(grad S_i, grad S_w,i, S_w)``: ``(N, P)``, ``(N, P)`` float64, ``(N,)``; a backward per sequence."""
    params = trainable(model)
    seq, w = hand_sequence_logprobs(model, batch, temperature, weighting)
    gs = np.stack([flat_grad(seq[i], params) for i in range(batch.n_sequences)])
    gw = np.stack([flat_grad(w[i], params) for i in range(batch.n_sequences)])
    return gs, gw, w.detach().double().numpy()


def brute_force_x(model, batch, temperature=1.0, weighting="token-mean", estimator="unbiased") -> np.ndarray:
    """``(B, P)``: X_n = -(1/G) sum_i (S_w,i - b_i) grad S_i - (1/G) sum_i grad S_w,i, literally."""
    gs, gw, sw = per_sequence_grads(model, batch, temperature, weighting)
    xs = []
    for rows in units_of(batch):
        g = len(rows)
        x = np.zeros(gs.shape[1])
        for i in rows:
            b_i = np.mean([sw[j] for j in rows if j != i])  # leave-one-out baseline
            x -= (sw[i] - b_i) * gs[i] / g
            if estimator == "unbiased":
                x -= gw[i] / g
        xs.append(x)
    return np.stack(xs)


def brute_force_grad_j_units(model, batch, adv: np.ndarray, aggregation: str) -> np.ndarray:
    """``(B_U, P)``: grad J_m, with J_U = mean_m J_m, from the hand objective restricted to unit m.

    J_m = B_U * (the terms of unit m in J_U): the aggregation's normalisers stay batch-wide.
    """
    params = trainable(model)
    lp = hand_token_logprobs(model, batch)
    out = []
    for rows in units_of(batch):
        keep = np.zeros_like(adv)
        keep[rows] = adv[rows]  # advantages of the other units set to 0: only unit m's terms remain
        out.append(batch.n_units * flat_grad(hand_objective(lp, batch, keep, aggregation), params))
    return np.stack(out)
