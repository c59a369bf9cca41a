"""``from_grad`` forms the step parameter by parameter in the reverse hook, never whole (``step_view``).

Against the step built whole by ``direction.build_direction`` from a copy of ``-grad`` (the path every
other direction takes): the same v entries, the same s_n up to the summation order of the chunked dot
products, and the caller's ``.grad``/optimizer state untouched; while the E pass runs, no formed
step is larger than one chunk and none outlives its dot product. ``CHUNK`` is lowered so that the test
model's parameters are cut into several chunks. Run: ``PYTHONPATH=src pytest -q tests/test_step_view.py``.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from core_support import random_batch, trainable
from test_from_grad import CASES, Case, assert_unchanged, setup, snapshot

import entropy_probe as ep
import entropy_probe.step_view as step_view
from entropy_probe.direction import build_direction
from entropy_probe.from_grad import direction_from_grad

SMALL_CHUNK = 16  # elements: TinyLM's embeddings and matrices (56 to 128 entries) span several chunks


def materialised_v(model, opt, kind: str, lr: float) -> dict[str, torch.Tensor]:
    """v built whole, the U-batch way, from a copy of the ascent gradient ``-grad``."""
    params = trainable(model)
    grads = {n: None if p.grad is None else -p.grad.detach().clone() for n, p in params.items()}
    return build_direction(kind, grads, params, opt, lr).v


@pytest.mark.parametrize("case", CASES, ids=str)
def test_step_formed_in_the_hook_is_the_whole_v(case: Case, monkeypatch):
    monkeypatch.setattr(step_view, "CHUNK", SMALL_CHUNK)
    model, opt = setup(case)
    kind = "sgd" if case.opt == "SGD" else "optimizer-step"
    lr = opt.param_groups[0]["lr"]
    whole = materialised_v(model, opt, kind, lr)
    before = snapshot(model, opt)
    view = direction_from_grad(kind, trainable(model), opt, lr, whole=False).v
    assert isinstance(view, step_view.StepView)
    # the shorter formula is taken where it applies (SGD; Adam/AdamW with state, no amsgrad, decoupled or
    # no decay), the rule itself elsewhere
    name_of = {id(p): n for n, p in model.named_parameters()}
    expected = {
        name_of[id(p)]
        for g in opt.param_groups
        for p in g["params"]
        if p.grad is not None
        and (
            case.opt == "SGD"
            or (case.warm_steps > 0 and not case.amsgrad and (case.opt == "AdamW" or g["weight_decay"] == 0))
        )
    }
    assert set(view.fast) == expected
    assert any(p.numel() > 2 * SMALL_CHUNK for p in model.parameters())  # the chunked path is taken
    for name, t in whole.items():  # elementwise the same arithmetic, chunk by chunk: the same bits
        assert torch.equal(view[name], t), name
        x = torch.randn(t.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(view.dot(name, x), torch.vdot(x.reshape(-1), t.reshape(-1)))
    E = random_batch(6, group_size=3, seed=11)
    cfg = ep.ProbeConfig(direction=kind)
    in_hook = ep.EntropyProbe(model, opt, cfg).run(eval_batch=E, from_grad=True)
    assert_unchanged(before, model, opt)  # .grad (the rule writes a copy of it), optimizer state, RNG
    along = ep.EntropyProbe(model, opt, cfg).run(eval_batch=E, direction=whole)
    # the s_n differ only by the order of the fp32 sums (chunks): rounding, 2^-24 per term
    torch.testing.assert_close(in_hook.per_unit, along.per_unit, rtol=1e-5, atol=1e-9)
    assert abs(in_hook.delta_h1 - along.delta_h1) <= 1e-5 * abs(along.delta_h1)


def test_no_step_is_held_whole_during_the_call(monkeypatch):
    """Every step the view forms during the call is at most one chunk, and each is freed before the next
    is formed: the call holds no parameter-sized step (only the small parameters' kept steps)."""
    monkeypatch.setattr(step_view, "CHUNK", SMALL_CHUNK)
    model, opt = setup(Case("Adam", 2, 1))  # L2 decay in the moments: the rule itself, chunk by chunk
    sizes: list[int] = []
    alive_at_each_form: list[int] = []
    formed: list[weakref.ref] = []
    real = step_view.StepView._form

    def tracking(self, name, start, stop):
        alive_at_each_form.append(sum(r() is not None for r in formed))
        out = real(self, name, start, stop)
        sizes.append(out.numel())
        formed.append(weakref.ref(out))
        return out

    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step"))
    assert not direction_from_grad("optimizer-step", trainable(model), opt, 1e-2, whole=False).v.fast
    E = random_batch(4, group_size=3, seed=5)
    reference = probe.run(eval_batch=E, from_grad=True)
    monkeypatch.setattr(step_view.StepView, "_form", tracking)
    # the whole call: the large-step diagnostic's forward at theta + eta v / 16 forms each stepped
    # parameter where it is read, from the view's chunks (stepped; tests/test_stepped.py)
    tracked = probe.run(eval_batch=E, from_grad=True)
    n_kept = sum(p.numel() < SMALL_CHUNK for p in model.parameters())
    n_large = sum(p.numel() >= SMALL_CHUNK for p in model.parameters())
    assert n_large >= 3 and max(sizes) <= SMALL_CHUNK
    # the small parameters' steps are formed once, when the view is made, and kept through the call;
    # then every unit's backward forms the large ones chunk by chunk
    during_pass = alive_at_each_form[n_kept:]
    assert len(during_pass) >= E.n_units * n_large
    assert max(during_pass) <= n_kept  # each chunk's step is dead before the next one is formed
    assert torch.equal(reference.per_unit, tracked.per_unit)  # the tracking changed nothing


def test_step_formed_once_when_asked_is_the_whole_v_exactly():
    """``step_in_hook=False``: every step kept whole (1x memory, no repetition): the bits of a given v."""
    model, opt = setup(Case("AdamW", 2, 2))
    lr = opt.param_groups[0]["lr"]
    whole = materialised_v(model, opt, "optimizer-step", lr)
    E = random_batch(5, group_size=3, seed=12)
    cfg = ep.ProbeConfig(direction="optimizer-step", step_in_hook=False)
    kept = ep.EntropyProbe(model, opt, cfg).run(eval_batch=E, from_grad=True)
    along = ep.EntropyProbe(model, opt, cfg).run(eval_batch=E, direction=whole)
    assert torch.equal(kept.per_unit, along.per_unit)
    assert isinstance(direction_from_grad("optimizer-step", trainable(model), opt, lr).v, dict)
    with pytest.raises(ValueError, match="ProbeConfig.step_in_hook: must be True or False"):
        ep.ProbeConfig(step_in_hook=1)


def test_view_is_read_only_and_checks_the_optimizer():
    model, opt = setup(Case("AdamW", 2, 1))
    view = direction_from_grad("optimizer-step", trainable(model), opt, 1e-2, whole=False).v
    assert list(view) == list(trainable(model)) and len(view) == len(trainable(model))
    with pytest.raises(TypeError):
        view["tok"] = torch.zeros(1)  # a Mapping: nothing can be written into v
    with pytest.raises(ValueError, match="optimizer-step"):
        direction_from_grad(
            "optimizer-step", trainable(model), torch.optim.SGD(model.parameters(), 0.1), 0.1, False
        )
