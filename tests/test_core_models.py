"""The probe on real model classes: GPT2LMHeadModel and LlamaForCausalLM built from tiny configs, and a
plain module. The backward engine's s_n equal a brute force (per-sequence backward passes, hand
log-probs, flattened vectors); padding side does not change S_i (position ids from the mask); a
bf16 model gives fp32 log-probs close to the fp32 model's.

Run: ``PYTHONPATH=src pytest -q tests/test_core_models.py``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from core_support import (
    TinyLM,
    brute_force_x,
    flat,
    hand_token_logprobs,
    random_batch,
    tiny_gpt2,
    tiny_llama,
    trainable,
)

import entropy_probe as ep
from entropy_probe.logprobs import position_ids_from_mask, sequence_logprobs, token_logprobs
from entropy_probe.vectors import dot, grad_of

VOCAB = 11
BUILDERS = {
    "gpt2": lambda: tiny_gpt2(seed=0, vocab=VOCAB),
    "llama": lambda: tiny_llama(seed=0, vocab=VOCAB),
    "plain": lambda: TinyLM(vocab=VOCAB, seed=0),
}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_backward_engine_matches_brute_force(kind):
    """s_n = v . X_n against X_n built from per-sequence gradients, flattened; a full run is finite."""
    model = BUILDERS[kind]()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    update = random_batch(3, vocab=VOCAB, seed=1, group_size=[2, 3, 2])
    evaluation = random_batch(3, vocab=VOCAB, seed=2, group_size=[3, 2, 2])
    probe = ep.EntropyProbe(
        model, opt, ep.ProbeConfig(entropy="sequence", direction="optimizer-step", microbatch_units=2)
    )
    r = probe.run(update, evaluation, truth=True)
    params = trainable(model)
    v = flat(probe.update_direction(update), params)
    s = brute_force_x(model, evaluation) @ v  # (B_E,)
    np.testing.assert_allclose(r.per_unit.numpy(), s, rtol=1e-4, atol=1e-6 * np.abs(s).max())
    assert r.delta_h1 == pytest.approx(1e-3 * s.mean(), rel=1e-4)
    values = [r.delta_h1, r.se_cond_e, r.se_total, r.se_jackknife, r.entropy, r.truth.delta_h, r.truth.se]
    assert all(math.isfinite(x) for x in values) and r.se_cond_e > 0 and r.entropy > 0


def test_fused_dot_equals_flattened_dot():
    """vectors.dot (one fused reduction) equals the dot of the flattened vectors; None grads count 0."""
    model = tiny_gpt2(seed=1, vocab=VOCAB)
    params = trainable(model)
    batch = random_batch(2, vocab=VOCAB, seed=3)
    loss = hand_token_logprobs(model, batch).sum()
    grads = grad_of(loss, params)
    gen = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    grads[next(iter(grads))] = None  # a parameter the loss does not reach
    flat_g = torch.cat(
        [(torch.zeros_like(p) if grads[n] is None else grads[n]).reshape(-1) for n, p in params.items()]
    )  # (P,)
    flat_v = torch.cat([v[n].reshape(-1) for n in params])  # (P,)
    d = dot(grads, v)
    assert d.dim() == 0 and d.dtype == torch.float32
    assert float(d) == pytest.approx(float(flat_g.double() @ flat_v.double()), rel=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_padding_side_does_not_change_sequence_logprobs(kind):
    """Left padding, right padding and each row alone (no padding) give the same S_i."""
    model = BUILDERS[kind]().eval()
    left = random_batch(3, vocab=VOCAB, seed=4, side="left", max_prompt=4)
    right = random_batch(3, vocab=VOCAB, seed=4, side="right", max_prompt=4)
    assert torch.equal(left.response_lengths, right.response_lengths) and (left.attention_mask == 0).any()
    with torch.no_grad():
        s_left = sequence_logprobs(model, left, 1.0, "sum").seq
        s_right = sequence_logprobs(model, right, 1.0, "sum").seq
        alone = []
        for i in range(left.n_sequences):  # row i without any padding
            real = left.attention_mask[i].bool()
            ids, resp = left.input_ids[i, real][None], left.response_mask[i, real][None]
            row = ep.RolloutBatch(
                ids.repeat(2, 1),
                torch.ones_like(ids).repeat(2, 1),
                resp.repeat(2, 1),
                torch.zeros(2, dtype=torch.long),
                rewards=torch.zeros(2),
            )
            alone.append(sequence_logprobs(model, row, 1.0, "sum").seq[0])
    torch.testing.assert_close(s_left, torch.stack(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_right, torch.stack(alone), rtol=1e-5, atol=1e-5)
    if kind == "gpt2":  # learned positions: without position ids from the mask, left padding is wrong
        with torch.no_grad():
            logits = model(input_ids=left.input_ids, attention_mask=left.attention_mask).logits
        lp = (
            torch.log_softmax(logits[:, :-1], -1).gather(-1, left.input_ids[:, 1:, None]).squeeze(-1)
        )  # (N, T-1)
        naive = (lp * left.response_mask[:, 1:]).sum(1)
        assert (naive - torch.stack(alone)).abs().max() > 1e-2


def test_bf16_model_gives_fp32_logprobs_close_to_fp32():
    model = tiny_gpt2(seed=2, vocab=VOCAB).eval()
    half = copy.deepcopy(model).to(torch.bfloat16)
    batch = random_batch(3, vocab=VOCAB, seed=5)
    with torch.no_grad():
        full_lp = sequence_logprobs(model, batch, 0.7, "token-mean")
        half_lp = sequence_logprobs(half, batch, 0.7, "token-mean")
    assert half_lp.seq.dtype == torch.float32 and half_lp.weighted.dtype == torch.float32
    # bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2% per operation). The logits here are
    # below 0.3 in size, so after two tiny blocks each token log-prob moves by a few 1e-3 at most
    # (measured 6e-4); 1e-2 per token is the bound.
    lengths = batch.response_lengths.float()
    assert ((half_lp.seq - full_lp.seq).abs() <= 1e-2 * lengths).all()
    assert ((half_lp.weighted - full_lp.weighted).abs() <= 1e-2).all()
    assert not torch.equal(half_lp.seq, full_lp.seq)  # it really ran in bf16
    # the log-softmax itself runs in fp32 on the bf16 logits (no second bf16 rounding of log-probs)
    with torch.no_grad():
        logits = half(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids_from_mask(batch.attention_mask),
        ).logits
    assert logits.dtype == torch.bfloat16
    lp = token_logprobs(logits, batch.input_ids, 0.7)
    exact = torch.log_softmax(logits.double()[:, :-1] / 0.7, -1).gather(-1, batch.input_ids[:, 1:, None])[
        ..., 0
    ]
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp[:, 1:].double(), exact, rtol=0, atol=1e-6)
    # the whole probe on the bf16 model: v in fp32, finite results close to the fp32 model's
    u, e = random_batch(3, vocab=VOCAB, seed=6), random_batch(4, vocab=VOCAB, seed=7)
    cfg = ep.ProbeConfig(lr=1e-3, direction="sgd")
    v = ep.EntropyProbe(half, config=cfg).update_direction(u)
    assert all(t.dtype == torch.float32 for t in v.values())
    r_half = ep.EntropyProbe(half, config=cfg).run(u, e)
    r_full = ep.EntropyProbe(model, config=cfg).run(u, e)
    assert math.isfinite(r_half.delta_h1) and math.isfinite(r_half.se_total)
    assert r_half.entropy == pytest.approx(r_full.entropy, rel=0.02)
