"""Teacher-forced log-probs against log_softmax by hand: temperature, weightings, position ids, call forms.

Run: ``PYTHONPATH=src pytest -q tests/test_core_logprobs.py``.
"""

from __future__ import annotations

import pytest
import torch
from core_support import TinyLM, hand_sequence_logprobs, random_batch
from torch import nn

from entropy_probe.logprobs import model_logits, position_ids_from_mask, sequence_logprobs


@pytest.mark.parametrize("weighting", ["token-mean", "sum"])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_sequence_logprobs_match_hand(weighting, temperature):
    model = TinyLM(seed=1)
    batch = random_batch(4, group_size=[2, 3, 4, 2], seed=2)
    got = sequence_logprobs(model, batch, temperature, weighting)
    seq, weighted = hand_sequence_logprobs(model, batch, temperature, weighting)
    torch.testing.assert_close(got.seq, seq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.weighted, weighted, rtol=1e-5, atol=1e-6)
    if weighting == "token-mean":
        torch.testing.assert_close(got.weighted * batch.response_lengths, got.seq, rtol=1e-5, atol=1e-6)
    # gradients agree too (the probe differentiates these)
    g1 = torch.autograd.grad(got.weighted.sum(), [model.tok])[0]
    g2 = torch.autograd.grad(weighted.sum(), [model.tok])[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_position_ids_from_mask_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pos = position_ids_from_mask(mask)
    assert (
        pos[0, 2:].tolist() == [0, 1, 2]
        and pos[1, :3].tolist() == [0, 1, 2]
        and pos[2].tolist() == [0, 1, 2, 3, 4]
    )


class NoPositions(nn.Module):
    """A model whose forward takes no position_ids and returns an object with .logits."""

    def __init__(self):
        super().__init__()
        self.lm = TinyLM(seed=3)

    def forward(self, input_ids, attention_mask):
        class Out:
            logits = self.lm(input_ids, attention_mask)

        return Out()


def test_models_without_position_ids_and_with_logits_attribute():
    model = NoPositions()
    batch = random_batch(3, seed=4)
    logits = model_logits(model, batch.input_ids, batch.attention_mask)
    assert logits.shape == (*batch.input_ids.shape, 7)
    seq, _ = hand_sequence_logprobs(model.lm, batch)
    torch.testing.assert_close(sequence_logprobs(model, batch, 1.0, "sum").seq, seq, rtol=1e-5, atol=1e-6)


def test_functional_call_params_replace_the_modules_own():
    """``params=`` evaluates at other parameters without touching the module (the truth uses it)."""
    model = TinyLM(seed=5)
    batch = random_batch(3, seed=6)
    shifted = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    other = TinyLM(seed=5)
    with torch.no_grad():
        for n, p in other.named_parameters():
            p.copy_(shifted[n])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = sequence_logprobs(model, batch, 1.0, "sum", params=shifted).seq
    torch.testing.assert_close(got, sequence_logprobs(other, batch, 1.0, "sum").seq)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("build", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("weighting", ["token-mean", "sum"])
def test_hugging_face_models_skip_prompt_logits_with_the_same_result(build, weighting):
    """HF models are asked for the logits from the earliest response position on (``logits_to_keep``);
    the log-probs equal the hand computation from the full (N, T, V) logits."""
    import core_support

    model = getattr(core_support, build)(seed=3).eval()
    batch = random_batch(3, seed=8, vocab=11)
    first = int(batch.response_mask.to(torch.uint8).argmax(1).min())
    assert first >= 2, "the test batch needs a prompt of at least 2 tokens to skip any logits"
    asked = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: asked.append(kw.get("logits_to_keep")), with_kwargs=True
    )
    lp = sequence_logprobs(model, batch, 0.8, weighting)
    hook.remove()
    assert asked == [batch.input_ids.shape[1] - first + 1]
    seq, weighted = hand_sequence_logprobs(model, batch, 0.8, weighting)
    torch.testing.assert_close(lp.seq, seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp.weighted, weighted, rtol=1e-5, atol=1e-5)
