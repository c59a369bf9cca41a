"""``logprobs.token_entropies`` against the entropy written out by hand (float64 softmax), its derivative
against autograd of that hand formula in reverse and forward mode, bf16 logits, and chunk sizes.

Run: ``PYTHONPATH=src pytest -q tests/test_token_entropies.py``.
"""

from __future__ import annotations

import pytest
import torch

from entropy_probe.logprobs import token_entropies, token_logprobs, token_logprobs_and_entropies


def hand_entropies(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(N, T)`` float64: entry t is -sum p log p of softmax(logits[t-1] / T); entry 0 is 0."""
    z = logits.double()[:, :-1] / temperature
    p = torch.softmax(z, dim=-1)
    h = -(p * torch.log_softmax(z, dim=-1)).sum(dim=-1)  # (N, T-1)
    return torch.cat([torch.zeros_like(h[:, :1]), h], dim=1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_token_entropies_match_hand(chunk, temperature):
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(3, 5, 7, generator=gen)  # V = 7: chunk 3 leaves a ragged last chunk
    got = token_entropies(logits, temperature, vocab_chunk=chunk)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), hand_entropies(logits, temperature), rtol=1e-6, atol=1e-6)


def test_token_entropies_extremes():
    """A one-hot distribution has H = 0 exactly and huge logits do not overflow; uniform has log V."""
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 2] = 1e4  # position 0 predicts token 1: one-hot
    got = token_entropies(logits, 1.0, vocab_chunk=2)
    assert float(got[0, 1]) == 0.0
    assert abs(float(got[0, 2]) - torch.log(torch.tensor(5.0)).item()) < 1e-6


@pytest.mark.parametrize("chunk", [2, 64])
def test_token_entropies_reverse_mode_gradient(chunk):
    """The pathwise derivative: autograd through the chunked (checkpointed) form equals autograd of the
    hand formula, for a random cotangent."""
    gen = torch.Generator().manual_seed(1)
    logits = (2.0 * torch.randn(2, 6, 9, generator=gen, dtype=torch.float64)).requires_grad_()
    w = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((token_entropies(logits, 0.8, chunk).double() * w).sum(), logits)
    (g_hand,) = torch.autograd.grad((hand_entropies(logits, 0.8) * w).sum(), logits)
    torch.testing.assert_close(g_got, g_hand, rtol=1e-5, atol=1e-6)
    # and the derivative itself against its closed form: dH/dz_a = -p_a (log p_a + H) / T
    z = logits.detach()[:, :-1] / 0.8
    logp = torch.log_softmax(z, dim=-1)
    h = -(logp.exp() * logp).sum(-1, keepdim=True)
    closed = -(logp.exp() * (logp + h)) / 0.8 * w[:, 1:, None]
    torch.testing.assert_close(g_got[:, :-1], closed, rtol=1e-5, atol=1e-6)
    assert float(g_got[:, -1].abs().max()) == 0.0  # the last position predicts nothing


def test_token_entropies_forward_mode_derivatives():
    """First and second directional derivatives by nested torch.func.jvp (as the jvp engine and the
    second order run it, under no_grad) against the hand formula's."""
    gen = torch.Generator().manual_seed(2)
    logits = 2.0 * torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    tangent = torch.randn(logits.shape, generator=gen, dtype=torch.float64)

    def second(fn):
        def first(x):
            return torch.func.jvp(fn, (x,), (tangent,))

        with torch.no_grad():
            (h, dh), (_, d2h) = torch.func.jvp(first, (logits,), (tangent,))
        return h, dh, d2h

    got = second(lambda x: token_entropies(x, 1.3, vocab_chunk=4).double())
    want = second(lambda x: hand_entropies(x, 1.3))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_token_entropies_bf16_logits_use_fp32_math():
    """bf16 logits: the result is fp32 and equals the fp32 computation on the same (rounded) logits."""
    gen = torch.Generator().manual_seed(3)
    logits = (4.0 * torch.randn(2, 5, 300, generator=gen)).bfloat16()
    got = token_entropies(logits, 1.0, vocab_chunk=64)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), hand_entropies(logits.float(), 1.0), rtol=1e-5, atol=1e-5)


def test_token_entropies_memory_is_chunked():
    """The reverse-mode graph keeps no fp32 copy of the whole vocabulary: the bytes saved for the
    backward (views of the caller's logits aside) are a few (N, T) rows, not an fp32 (N, T, V) copy."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 8, 4096, generator=gen).bfloat16().requires_grad_()
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():  # not a view of the logits
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_entropies(logits, 1.0, vocab_chunk=256).sum().backward()
    full_fp32 = logits.numel() * 4
    assert sum(saved) < full_fp32 / 4, (sum(saved), full_fp32)


@pytest.mark.parametrize("chunk", [3, 8192])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_one_normaliser_gives_both_terms(chunk, temperature):
    """``token_logprobs_and_entropies`` (one log-normaliser for both) against the two functions: bit for
    bit in one chunk; across chunks the normaliser is a logsumexp of chunk logsumexps (fp32 rounding).
    Gradients too (reverse mode through the checkpointed chunks)."""
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(3, 6, 10, generator=gen)).requires_grad_(True)
    ids = torch.randint(0, 10, (3, 6), generator=gen)
    lp, h = token_logprobs_and_entropies(logits, ids, temperature, chunk)
    ref_lp, ref_h = token_logprobs(logits, ids, temperature), token_entropies(logits, temperature, chunk)
    if chunk >= 10:
        assert torch.equal(lp, ref_lp) and torch.equal(h, ref_h)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h, ref_h, rtol=1e-6, atol=1e-6)
    w = torch.randn(3, 6, generator=gen)
    (g,) = torch.autograd.grad(((lp + h) * w).sum(), logits)
    (ref,) = torch.autograd.grad(((ref_lp + ref_h) * w).sum(), logits)
    torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
