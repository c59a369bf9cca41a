"""Gradient checkpointing stays on inside the probe, dropout stays off (DESIGN section 17).

Hugging Face checkpointing acts only when the checkpointing layer is in train mode; the probe used to
put the whole model in eval mode, which silently turned it off. The probe now keeps the layer's own
flag on while every dropout (modules, and Llama's functional attention dropout) is off.

Evidence of recomputation: a forward hook on a submodule *inside* a checkpointed block fires once per
forward, and once more when a backward recomputes the block: with checkpointing the count must be
exactly the count without plus one per reverse pass through a differentiated forward.

Run: ``PYTHONPATH=src pytest -q tests/test_core_checkpointing.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from core_support import random_batch, tiny_gpt2, tiny_llama

import entropy_probe as ep

VOCAB = 11


def _count_calls(module: torch.nn.Module) -> list[int]:
    """``[forwards, of which with grad enabled]`` of ``module``, counted by a forward hook."""
    calls = [0, 0]

    def hook(*_):
        calls[0] += 1
        calls[1] += torch.is_grad_enabled()

    module.register_forward_hook(hook)
    return calls


def _modes(model):
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("entropy", ["token", "sequence"])
@pytest.mark.parametrize("engine", ["backward", "jvp"])
def test_checkpointing_recomputes_in_every_backward_and_changes_nothing(engine, entropy):
    model = tiny_gpt2(seed=0, vocab=VOCAB)
    model.gradient_checkpointing_enable()
    model.train()  # the caller is training
    calls = _count_calls(model.transformer.h[0].attn)  # inside the checkpointed block's forward
    U, E = random_batch(3, vocab=VOCAB, seed=1), random_batch(4, vocab=VOCAB, seed=2)
    cfg = ep.ProbeConfig(lr=1e-2, direction="sgd", engine=engine, microbatch_units=2, entropy=entropy)
    modes = _modes(model)
    checkpointed = ep.EntropyProbe(model, config=cfg).run(U, E)
    n_checkpointed = calls[0]
    assert _modes(model) == modes  # the caller's modes come back exactly

    model.gradient_checkpointing_disable()
    calls[:] = [0, 0]
    plain = ep.EntropyProbe(model, config=cfg).run(U, E)
    n_plain, n_differentiated = calls
    # Forwards without grad (the jvp passes, the backward engine's large-step diagnostic at theta + eta
    # v / 16) are not checkpointed; every differentiated forward is recomputed once per reverse pass
    # through it. The token level differentiates some forwards twice (the numerator's and the
    # denominator's surrogate, engines/token.py): the backward engine each E unit's, the jvp engine each
    # microbatch of the halves' X sums (one per half here).
    twice = 0 if entropy == "sequence" else E.n_units if engine == "backward" else 2
    assert 0 < n_differentiated < n_plain  # both kinds of forward are in the count
    assert n_checkpointed == n_plain + n_differentiated + twice, (n_checkpointed, n_plain, n_differentiated)
    # Recomputation replays the same arithmetic: the same numbers, up to fp32 reassociation.
    assert checkpointed.delta_h1 == pytest.approx(plain.delta_h1, rel=1e-6)
    assert checkpointed.se_cond_e == pytest.approx(plain.se_cond_e, rel=1e-6)
    torch.testing.assert_close(checkpointed.per_unit, plain.per_unit, rtol=1e-6, atol=1e-12)


def test_reentrant_checkpointing_is_left_off_and_works():
    """Reentrant checkpointing cannot serve torch.autograd.grad: those layers run unchanged (no recompute)."""
    model = tiny_gpt2(seed=0, vocab=VOCAB)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    calls = _count_calls(model.transformer.h[0].attn)
    U, E = random_batch(3, vocab=VOCAB, seed=1), random_batch(4, vocab=VOCAB, seed=2)
    cfg = ep.ProbeConfig(lr=1e-2, direction="sgd")
    first = ep.EntropyProbe(model, config=cfg).run(U, E)
    n_reentrant = calls[0]
    model.gradient_checkpointing_disable()
    calls[0] = 0
    plain = ep.EntropyProbe(model, config=cfg).run(U, E)
    assert n_reentrant == calls[0]
    assert first.delta_h1 == plain.delta_h1


def test_llama_attention_dropout_is_off_with_checkpointing_on():
    """Llama applies attention dropout by a float, not a module, when its attention is training: the probe
    keeps only the checkpointing layers' flag on, so a train-mode model gives the eval-mode numbers."""
    torch.manual_seed(0)
    model = tiny_llama(seed=0, vocab=VOCAB)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.gradient_checkpointing_enable()
    U, E = random_batch(3, vocab=VOCAB, seed=1), random_batch(4, vocab=VOCAB, seed=2)
    cfg = ep.ProbeConfig(lr=1e-2, direction="sgd")
    model.train()
    with pytest.warns(RuntimeWarning, match="active dropout"):
        in_train = ep.EntropyProbe(model, config=cfg).run(U, E)
    torch.manual_seed(7)  # another dropout stream would change a result that had dropout in it
    again = ep.EntropyProbe(model, config=cfg).run(U, E)
    model.eval()
    in_eval = ep.EntropyProbe(model, config=cfg).run(U, E)
    assert in_train.delta_h1 == pytest.approx(in_eval.delta_h1, rel=1e-6)
    assert again.delta_h1 == in_train.delta_h1


def test_dropout_warning_once_per_model_and_only_when_active():
    U, E = random_batch(3, vocab=VOCAB, seed=1), random_batch(4, vocab=VOCAB, seed=2)
    cfg = ep.ProbeConfig(lr=1e-2, direction="sgd")
    noisy = tiny_gpt2(seed=0, vocab=VOCAB, dropout=0.1).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = ep.EntropyProbe(noisy, config=cfg)
        probe.run(U, E)
        probe.run(U, E)
        probe.update_direction(U)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("dropout-free step" in m for m in messages) == 1, messages
    for quiet in (tiny_gpt2(seed=0, vocab=VOCAB, dropout=0.1).eval(), tiny_gpt2(seed=0, vocab=VOCAB).train()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ep.EntropyProbe(quiet, config=cfg).run(U, E)
        assert not [w for w in caught if "dropout" in str(w.message)]


def test_probe_forwards_build_no_kv_cache():
    """Nothing reuses a KV cache in the probe; under checkpointing it would keep every layer's K and V."""
    model = tiny_llama(seed=0, vocab=VOCAB)
    model.gradient_checkpointing_enable()
    seen = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True
    )
    U, E = random_batch(3, vocab=VOCAB, seed=1), random_batch(4, vocab=VOCAB, seed=2)
    ep.EntropyProbe(model, config=ep.ProbeConfig(lr=1e-2, direction="sgd")).run(U, E, truth=True)
    assert seen and all(flag is False for flag in seen)


def test_modes_come_back_when_the_probe_raises_with_checkpointing_on():
    model = tiny_gpt2(seed=0, vocab=VOCAB)
    model.gradient_checkpointing_enable()
    model.train()
    model.transformer.h[1].eval()  # mixed modes, each must come back
    modes = _modes(model)
    calls = [0]

    def fail_on_third(module, args, kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected failure")

    handle = model.register_forward_pre_hook(fail_on_third, with_kwargs=True)
    U, E = random_batch(3, vocab=VOCAB, seed=1), random_batch(4, vocab=VOCAB, seed=2)
    with pytest.raises(RuntimeError, match="injected failure"):
        ep.EntropyProbe(model, config=ep.ProbeConfig(lr=1e-2, direction="sgd")).run(U, E)
    handle.remove()
    assert calls[0] == 3 and _modes(model) == modes
