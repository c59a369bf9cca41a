"""The stepped forwards (truth, large-step diagnostic, lookahead) form each stepped parameter where the
forward reads it (``stepped``), never all of them at once.

Against the stepped parameters formed whole (``vectors.stepped_parameters``, eager, with an eager fp32
copy of a bf16 model): the same log-probs and per-token terms, bit for bit, for a ``StepView`` and a
whole v, fp32 and bf16, GPT-2 (tied LM head) and Llama; while a stepped forward runs, at most one other
parameter-sized stepped value is alive when one is formed (the two operands of one op), so the forward
never holds the stepped model; the whole ``run(eval_batch=E, from_grad=True)`` with the default
diagnostic forms no step larger than one chunk; the live parameters are never written, also when the
stepped forward raises. Run: ``PYTHONPATH=src pytest -q tests/test_stepped.py``.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from core_support import random_batch, tiny_gpt2, tiny_llama, trainable
from test_from_grad import Case, assert_unchanged, setup, snapshot

import entropy_probe as ep
import entropy_probe.step_view as step_view
import entropy_probe.stepped as stepped
from entropy_probe.from_grad import direction_from_grad
from entropy_probe.logprobs import logprobs_at
from entropy_probe.passes import Passes
from entropy_probe.response_tokens import response_tokens_at
from entropy_probe.truth import full_precision_state
from entropy_probe.vectors import stepped_parameters

SMALL_CHUNK = 64  # elements: the tiny models' matrices and embeddings (176 to 512 entries) span chunks


def warm_model(build, dtype: torch.dtype):
    """A model with a warm AdamW (one real step) and a fresh ``.grad``, in ``dtype``."""
    model = build(seed=3).to(dtype).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batch = random_batch(3, group_size=2, seed=8, vocab=11)
    for _ in range(2):
        opt.zero_grad()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits.float().logsumexp(-1).mean().backward()
        if opt.state == {}:
            opt.step()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=lambda b: b.__name__)
@pytest.mark.parametrize("whole", [False, True], ids=["step view", "whole v"])
def test_stepped_forward_is_the_whole_step_bit_for_bit(build, dtype, whole, monkeypatch):
    monkeypatch.setattr(step_view, "CHUNK", SMALL_CHUNK)
    model, opt = warm_model(build, dtype)
    params = trainable(model)
    assert any(p.numel() > 2 * SMALL_CHUNK for p in params.values())  # the chunked path is taken
    v = direction_from_grad("optimizer-step", params, opt, 1e-2, whole).v
    assert isinstance(v, step_view.StepView) != whole
    base = full_precision_state(model, params)
    assert (base is None) == (dtype == torch.float32)
    eager_base = None
    if base is not None:  # every floating tensor of the model, as fp32 casts formed when read
        names = {n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}
        assert set(base) == names
        large = {n for n, t in base.items() if t.numel() >= SMALL_CHUNK}
        assert large and all(isinstance(base[n], stepped.FormedOnRead) for n in large)
        assert not any(isinstance(t, stepped.FormedOnRead) for n, t in base.items() if n not in large)
        eager_base = {n: t.value() if n in large else t for n, t in base.items()}
        assert all(t.dtype == torch.float32 for t in eager_base.values())
    E = random_batch(4, group_size=3, seed=9, vocab=11)
    cfg = ep.ProbeConfig(microbatch_units=2)
    for step in (0.5, -1e-3):
        lazy = Passes().logprobs_stepped(model, params, E, cfg, v, step, base)
        eager = logprobs_at(model, stepped_parameters(params, v, step, eager_base), E, cfg)
        assert torch.equal(lazy.seq, eager.seq) and torch.equal(lazy.weighted, eager.weighted)
        tokens = Passes().tokens_stepped(model, params, E, cfg, v, step, base)
        expected = response_tokens_at(model, stepped_parameters(params, v, step, eager_base), E, 1.0, 2)
        assert torch.equal(tokens.logp, expected.logp) and torch.equal(tokens.entropy, expected.entropy)
    at_theta = Passes().logprobs_stepped(model, params, E, cfg, v, 0.0, base)
    if base is not None:  # fp32 at theta: exactly the bf16 values, evaluated in fp32
        reference = logprobs_at(model, eager_base, E, cfg)
        assert torch.equal(at_theta.seq, reference.seq)


def test_no_stepped_parameter_is_held_whole_during_the_forward(monkeypatch):
    """When a stepped value is formed, at most one other formed value is still alive: the other operand of
    the same op. So the forward holds no stepped model (values below a chunk are formed up front)."""
    monkeypatch.setattr(step_view, "CHUNK", SMALL_CHUNK)
    model, opt = warm_model(tiny_gpt2, torch.float32)
    params = trainable(model)
    v = direction_from_grad("optimizer-step", params, opt, 1e-2, whole=False).v
    formed: list[weakref.ref] = []
    alive_at_each_form: list[int] = []
    real = stepped.FormedOnRead.value

    def tracking(self):
        alive_at_each_form.append(sum(r() is not None for r in formed))
        out = real(self)
        formed.append(weakref.ref(out))
        return out

    monkeypatch.setattr(stepped.FormedOnRead, "value", tracking)
    E = random_batch(4, group_size=3, seed=9, vocab=11)
    cfg = ep.ProbeConfig(microbatch_units=2)
    Passes().logprobs_stepped(model, params, E, cfg, v, 0.5)
    large = [p for p in params.values() if p.numel() >= SMALL_CHUNK]
    assert len(large) >= 4 and len(formed) >= 2 * len(large)  # each formed again in each microbatch
    assert max(alive_at_each_form) <= 1
    assert all(r() is None for r in formed)  # nothing outlives the forward


def test_whole_call_forms_no_step_larger_than_a_chunk(monkeypatch):
    """``run(eval_batch=E, from_grad=True)`` with the defaults (the diagnostic's forward at theta + eta v /
    16 included, and the lookahead forced on): every step the view forms is one chunk, dead before the
    next is formed; the result is the one of a whole v to fp32 rounding (the same stepped forward bits)."""
    monkeypatch.setattr(step_view, "CHUNK", 16)
    model, opt = setup(Case("Adam", 2, 1))
    sizes, alive, formed = [], [], []
    real = step_view.StepView._form

    def tracking(self, name, start, stop):
        alive.append(sum(r() is not None for r in formed))
        out = real(self, name, start, stop)
        sizes.append(out.numel())
        formed.append(weakref.ref(out))
        return out

    E = random_batch(4, group_size=3, seed=5)
    cfg = ep.ProbeConfig(direction="optimizer-step", lookahead="always")
    monkeypatch.setattr(step_view.StepView, "_form", tracking)
    result = ep.EntropyProbe(model, opt, cfg).run(eval_batch=E, from_grad=True, truth=True)
    n_kept = sum(p.numel() < 16 for p in model.parameters())
    assert max(sizes) <= 16 and max(alive[n_kept:]) <= n_kept
    monkeypatch.setattr(step_view.StepView, "_form", real)
    whole = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step", lookahead="always"))
    v = direction_from_grad("optimizer-step", trainable(model), opt, opt.param_groups[0]["lr"]).v
    along = whole.run(eval_batch=E, direction=v, truth=True)
    assert result.lookahead.delta_h == along.lookahead.delta_h  # the same stepped forwards, bit for bit
    assert result.truth.delta_h == along.truth.delta_h
    assert result.prediction.ess_fraction == pytest.approx(along.prediction.ess_fraction, rel=1e-9)


def test_a_failing_stepped_forward_leaves_the_parameters_untouched(monkeypatch):
    """The stepped forward never writes a live parameter: when it raises midway (the diagnostic's forward),
    parameters, ``.grad``, optimizer state, RNG and modes are bit-identical."""
    model, opt = setup(Case("AdamW", 2, 2))
    before = snapshot(model, opt)
    versions = {n: p._version for n, p in model.named_parameters()}
    real = stepped.stepped_state

    def failing(params, v, step, base=None):
        out = real(params, v, step, base)
        name = next(iter(out))
        value = out[name]

        def boom():
            raise RuntimeError("injected failure in the stepped forward")

        out[name] = stepped.FormedOnRead(value, value.dtype, boom)
        return out

    monkeypatch.setattr("entropy_probe.passes.stepped_state", failing)
    with pytest.raises(RuntimeError, match="injected failure"):
        # the backward engine: its large-step diagnostic is a stepped forward (jvp reads the exact dS_i)
        ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step", engine="backward")).run(
            eval_batch=random_batch(3, seed=4), from_grad=True
        )
    assert_unchanged(before, model, opt)
    assert {n: p._version for n, p in model.named_parameters()} == versions  # never written in place
