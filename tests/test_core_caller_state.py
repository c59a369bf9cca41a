"""The probe never loses the caller's state, on success and when an exception is raised inside it.

After ``run()`` (also with ``truth=True``) and ``update_direction()`` the model's parameters, ``.grad``
(the caller's accumulated gradients, and None grads staying None), the optimizer state (no entry
created for a parameter without state), the CPU RNG state and the train/eval mode of every submodule
are bit-identical to before. Failures are injected inside the probe: a function that draws random
numbers and flips modes before raising, NaN logits on the k-th forward, a failing dot product.

Run: ``PYTHONPATH=src pytest -q tests/test_core_caller_state.py``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from core_support import random_batch, tiny_gpt2
from torch import nn

import entropy_probe as ep
import entropy_probe.engines.backward as projections_module
import entropy_probe.probe as probe_module

VOCAB = 11


class NaNOnCall(nn.Module):
    """Wraps a causal LM; the ``nan_call``-th forward returns NaN logits at a real token of row 0."""

    def __init__(self, inner: nn.Module, nan_call: int | None):
        super().__init__()
        self.inner, self.nan_call, self.calls = inner, nan_call, 0

    def forward(self, input_ids, attention_mask, position_ids=None):
        self.calls += 1
        logits = self.inner(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).logits
        if self.calls == self.nan_call:
            logits = logits.clone()
            logits[0, -1] = float("nan")  # left padding: the last position of every row is real
        return logits


def caller_setup(nan_call=None):
    """A GPT-2 in train mode with dropout, one block in eval mode, a frozen parameter, accumulated grads
    with one None, and an AdamW (two groups) with state on all but one parameter."""
    model = NaNOnCall(tiny_gpt2(seed=0, vocab=VOCAB, dropout=0.1), nan_call)
    model.train()
    model.inner.transformer.h[1].eval()  # mixed modes: each must come back as it was
    model.inner.transformer.h[0].ln_1.weight.requires_grad_(False)
    no_state = model.inner.transformer.h[1].mlp.c_fc.bias
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [dict(params=trainable[:5], lr=1e-3), dict(params=trainable[5:], lr=3e-4, weight_decay=0.0)]
    )
    batch = random_batch(3, vocab=VOCAB, seed=99)
    for _ in range(2):
        opt.zero_grad()
        model(batch.input_ids, batch.attention_mask).float().logsumexp(-1).mean().backward()
        no_state.grad = None  # never stepped: the optimizer has no state for it
        opt.step()
    opt.zero_grad()
    model(batch.input_ids, batch.attention_mask).square().mean().backward()  # the caller's accumulated grads
    no_state.grad = None
    assert no_state not in opt.state
    return model, opt


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return dict(
        params={n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        grads={n: None if p.grad is None else (p.grad, p.grad.clone()) for n, p in model.named_parameters()},
        opt_state=copy.deepcopy(opt.state_dict()),
        opt_keys={id(p) for p in opt.state},
        rng=torch.get_rng_state(),
        modes={n: m.training for n, m in model.named_modules()},
    )


def _same_tree(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_tree(x, y) for x, y in zip(a, b))
    return a == b


def assert_unchanged(before: dict, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    after = dict(model.named_parameters())
    assert after.keys() == before["params"].keys()
    for n, (obj, value, req) in before["params"].items():
        assert after[n] is obj and torch.equal(after[n].detach(), value) and after[n].requires_grad == req, n
        g = before["grads"][n]
        if g is None:
            assert after[n].grad is None, f"{n}: a None grad was created"
        else:
            assert after[n].grad is g[0] and torch.equal(after[n].grad, g[1]), f"{n}: grad changed"
    assert _same_tree(opt.state_dict(), before["opt_state"]), "optimizer state changed"
    assert {id(p) for p in opt.state} == before["opt_keys"], "optimizer state gained or lost entries"
    assert torch.equal(torch.get_rng_state(), before["rng"]), "CPU RNG state changed"
    assert {n: m.training for n, m in model.named_modules()} == before["modes"], "train/eval modes changed"


def _rng_and_mode_then(then: Callable):
    """Inside the probe: draw random numbers, put the model in train mode, then ``then()``."""

    def inner(call, *args, **kwargs):  # measure_truth's first argument: the call (context.ProbeCall)
        torch.rand(100)
        call.module.train()
        return then(call, *args, **kwargs)

    return inner


def _raise(*_, **__):
    raise RuntimeError("injected failure")


@dataclass(frozen=True)
class Scenario:
    name: str
    call: str  # "run", "run-truth" or "update_direction"
    direction: str = "optimizer-step"
    patch: str | None = None  # what is replaced inside the probe
    nan_call: int | None = None  # NaN logits on this forward
    raises: type | None = None
    second_order: bool = False  # with the nested forward-mode pass (and its layer_norm / silu composites)


SCENARIOS = [
    Scenario("run", "run", "adam-preconditioned"),
    Scenario("run-truth", "run-truth"),
    Scenario("update_direction", "update_direction"),
    Scenario("truth-draws-rng-and-flips-mode", "run-truth", patch="truth-rng"),
    Scenario("truth-raises-after-rng-and-mode", "run-truth", patch="truth-raise", raises=RuntimeError),
    Scenario("dot-raises-on-2nd-unit", "run", "sgd", patch="dot-raise", raises=RuntimeError),
    Scenario("nan-logits-in-update-pass", "run", nan_call=2, raises=ValueError),
    Scenario("nan-logits-in-eval-pass", "run-truth", nan_call=6, raises=ValueError),
    Scenario(
        "nan-logits-in-truth", "run-truth", nan_call=12, raises=ValueError
    ),  # U: 2, E: 4, se_total: 3, truth: 4 forwards
    Scenario("run-truth-second-order", "run-truth", second_order=True),
    # U: 2, E: 4, then the second-order pass (2 microbatches of 2 units): its first forward
    Scenario("nan-logits-in-second-order", "run", nan_call=7, raises=ValueError, second_order=True),
]


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda s: s.name)
def test_caller_state_is_bit_identical(sc: Scenario, monkeypatch):
    model, opt = caller_setup(sc.nan_call)
    update, evaluation = random_batch(3, vocab=VOCAB, seed=1), random_batch(4, vocab=VOCAB, seed=2)
    if sc.patch == "truth-rng":  # the sequence and the token-level truth alike
        for name in ("measure_truth", "measure_token_truth"):
            monkeypatch.setattr(probe_module, name, _rng_and_mode_then(getattr(probe_module, name)))
    elif sc.patch == "truth-raise":
        for name in ("measure_truth", "measure_token_truth"):
            monkeypatch.setattr(probe_module, name, _rng_and_mode_then(_raise))
    elif sc.patch == "dot-raise":
        made = []
        real = projections_module._dot_and_drop

        def failing_in_2nd_unit(dots, i, *rest):  # raise inside the backward of the 2nd E unit, mid-pass
            made.append(i)
            inner, second_unit = real(dots, i, *rest), made.count(0) >= 2

            def hook(g):
                if second_unit:
                    torch.rand(10)
                    raise RuntimeError("injected failure")
                return inner(g)

            return hook

        monkeypatch.setattr(projections_module, "_dot_and_drop", failing_in_2nd_unit)
    probe = ep.EntropyProbe(
        model, opt, ep.ProbeConfig(direction=sc.direction, microbatch_units=2, second_order=sc.second_order)
    )
    functional = (torch.nn.functional.layer_norm, torch.nn.functional.silu)
    before = snapshot(model, opt)
    model.calls = 0

    def call():
        if sc.call == "update_direction":
            return probe.update_direction(update)
        return probe.run(update, evaluation, truth=sc.call == "run-truth")

    if sc.raises is None:
        out = call()
        if sc.call == "run-truth":
            assert out.truth is not None
    else:
        with pytest.raises(sc.raises, match="injected failure|not finite"):
            call()
    if sc.nan_call is not None:
        assert model.calls == sc.nan_call  # the failure happened where intended, mid-run
    assert_unchanged(before, model, opt)
    assert (torch.nn.functional.layer_norm, torch.nn.functional.silu) == functional  # composites lifted
    assert not any(p._backward_hooks for p in model.parameters())  # the engine's gradient hooks removed


def test_probe_runs_in_eval_mode_whatever_the_callers_mode():
    """Dropout is off inside the probe: a train-mode model gives the eval-mode result, run after run."""
    model, opt = caller_setup()
    update, evaluation = random_batch(3, vocab=VOCAB, seed=1), random_batch(4, vocab=VOCAB, seed=2)
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step"))
    first = probe.run(update, evaluation)
    torch.manual_seed(123)  # a different dropout stream would change a train-mode result
    second = probe.run(update, evaluation)
    model.eval()
    in_eval = probe.run(update, evaluation)
    assert first.delta_h1 == second.delta_h1 == in_eval.delta_h1
    assert torch.equal(first.per_unit, in_eval.per_unit)


def test_probe_works_inside_no_grad():
    """Callers often log under torch.no_grad(): the probe still differentiates, with the same result."""
    model, opt = caller_setup()
    update, evaluation = random_batch(3, vocab=VOCAB, seed=1), random_batch(4, vocab=VOCAB, seed=2)
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="adam-preconditioned"))
    plain = probe.run(update, evaluation)
    with torch.no_grad():
        inside = probe.run(update, evaluation)
        assert not torch.is_grad_enabled()  # and grad mode comes back off
    assert inside.delta_h1 == plain.delta_h1 and inside.se_total == plain.se_total
