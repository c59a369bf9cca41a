"""One fp32 copy of the parameters for v, one more for a gradient in flight (DESIGN section 17).

The figures (peak memory / parameter bytes) come from benchmarks/bench_memory.py (docs/performance.md);
these tests pin the structure that makes them: v is built in the gradient's own storage, "sgd" keeps
no per-parameter scale tensor, and no reverse pass starts while the previous pass's gradients live.

Run: ``PYTHONPATH=src pytest -q tests/test_core_memory.py``.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from core_support import random_batch, tiny_gpt2

import entropy_probe as ep
import entropy_probe.engines.backward as backward_engine
from entropy_probe.direction import build_direction

VOCAB = 11


def _grads(model, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["sgd", "adam-preconditioned"])
def test_v_is_built_in_the_gradients_storage(kind):
    model = tiny_gpt2(seed=0, vocab=VOCAB)
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grads = _grads(model)
    expected = build_direction(kind, {n: g.clone() for n, g in grads.items()}, params, opt, 1e-3).v
    ptrs = {n: g.data_ptr() for n, g in grads.items()}
    out = build_direction(kind, grads, params, opt, 1e-3)
    assert not grads  # consumed
    for n, t in out.v.items():
        assert t.data_ptr() == ptrs[n], n  # no second copy
        torch.testing.assert_close(t, expected[n], rtol=0, atol=0)


def _track_gradients(monkeypatch) -> list[list[weakref.ref]]:
    """Weak references to the gradients of every reverse pass of the backward engine, pass by pass; each
    pass first records which tensors of the pass before it are still alive."""
    passes: list[list[weakref.ref]] = []
    still_alive: list[int] = []
    real = backward_engine.grad_of

    def tracked(loss, params):
        still_alive.append(sum(r() is not None for r in passes[-1]) if passes else 0)
        out = real(loss, params)
        passes.append([weakref.ref(g) for g in out.values() if g is not None])
        return out

    monkeypatch.setattr(backward_engine, "grad_of", tracked)
    return still_alive


def test_eval_pass_never_holds_x_n_whole(monkeypatch):
    """Each parameter's share of X_n is dotted with v and dropped as the backward forms it: when the
    engine's hook sees one parameter's gradient, every gradient it saw before is already freed."""
    model = tiny_gpt2(seed=0, vocab=VOCAB)
    U, E = random_batch(3, vocab=VOCAB, seed=1), random_batch(5, vocab=VOCAB, seed=2)
    probe = ep.EntropyProbe(
        model, config=ep.ProbeConfig(lr=1e-2, direction="sgd", unconditional_se=False, engine="backward")
    )
    v = probe.update_direction(U)
    seen: list[weakref.ref] = []
    alive_at_each_call: list[int] = []
    real = backward_engine._dot_and_drop

    def tracking(*args):
        inner = real(*args)

        def hook(g):
            alive_at_each_call.append(sum(r() is not None for r in seen))
            seen.append(weakref.ref(g))
            return inner(g)

        return hook

    monkeypatch.setattr(backward_engine, "_dot_and_drop", tracking)
    reference = ep.EntropyProbe(model, config=probe.config).run(eval_batch=E, direction=v)
    n_tensors = sum(1 for _ in model.parameters())
    # every unit's backward reached (nearly) every parameter tensor
    assert len(alive_at_each_call) >= 5 * (n_tensors - 2)
    assert max(alive_at_each_call) == 0  # nothing held: the gradient is never materialised whole
    monkeypatch.setattr(backward_engine, "_dot_and_drop", real)
    plain = ep.EntropyProbe(model, config=probe.config).run(eval_batch=E, direction=v)
    assert torch.equal(reference.per_unit, plain.per_unit)  # the tracking changed nothing


def test_update_pass_keeps_only_the_running_sum(monkeypatch):
    """The first microbatch's gradients become the running sum (kept, then v); later ones are freed."""
    model = tiny_gpt2(seed=0, vocab=VOCAB)
    U = random_batch(4, vocab=VOCAB, seed=1)
    probe = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=1e-2, direction="sgd", microbatch_units=1))
    still_alive = _track_gradients(monkeypatch)
    probe.update_direction(U)
    n_tensors = sum(1 for _ in model.parameters())
    assert len(still_alive) == 4
    assert still_alive[1] == n_tensors and still_alive[2:] == [0, 0]
