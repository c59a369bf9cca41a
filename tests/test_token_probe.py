"""``run(truth=True)``, ``second_order`` and ``measure_change`` of the token-level entropy through the probe
(DESIGN sections 6, 11, 12 and 20).

Run: ``PYTHONPATH=src pytest -q tests/test_token_probe.py``.

The forecast's delta_h1 comes from the first-order engines (``engines.token``), delta_h2 and the truth from
this wave's second-order pass and importance-weighted estimator: on one E the truth minus the forecast
must shrink like alpha^2 (first order) and alpha^3 (second), for both engines and both functionals
measured through the per-token terms. ``measure_change`` after a real ``optimizer.step()`` must equal the
functional truth of the same step.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from core_support import TinyLM, random_batch
from test_from_grad import Case, assert_unchanged, setup, snapshot

import entropy_probe as ep
from entropy_probe.toy import TabularPolicy, sample_enumerated

K_SE = 4.0  # two-sided P(|z| > 4) = 6e-5


@pytest.mark.parametrize("engine", ["backward", "jvp"])
@pytest.mark.parametrize("entropy", ["token", "sequence-sum"])
def test_truth_minus_forecast_is_the_taylor_remainder_through_the_probe(engine, entropy):
    policy = TabularPolicy(seed=1, scale=2.0)
    alphas = (1 / 16, 1 / 8, 1 / 4)
    functional = (
        dict(entropy="token") if entropy == "token" else dict(entropy="sequence", entropy_weighting="sum")
    )
    cfg = ep.ProbeConfig(
        lr=10.0,
        direction="sgd",
        second_order=True,
        truth_alphas=alphas,
        engine=engine,
        temperature=0.8,
        **functional,
    )
    r = ep.EntropyProbe(policy, config=cfg).run(
        sample_enumerated(policy, 16, seed=5, temperature=0.8),
        sample_enumerated(policy, 32, seed=6, temperature=0.8),
        truth=True,
    )
    first = [t - a * r.delta_h1 for t, a in zip(r.truth.delta_h_at, alphas)]
    second = [t - a * r.delta_h1 - a * a * r.delta_h2 for t, a in zip(r.truth.delta_h_at, alphas)]
    # log2 of the ratio per doubling of alpha is the order of the remainder plus the next term's share
    # (measured, token/backward: first 1.9, second 3.3, 3.5); a truth whose derivative is not the
    # forecast's leaves a first-order gap (log2 ratio 1). The per-unit SE of truth - forecast shrinks alike.
    for small, large in zip(first, first[1:]):
        assert 1.7 <= math.log2(large / small) <= 2.3, first
    for small, large in zip(second, second[1:]):
        assert 2.7 <= math.log2(large / small) <= 3.8, second
    for small, large in zip(r.truth.se_diff_at, r.truth.se_diff_at[1:]):
        assert 1.7 <= math.log2(large / small) <= 2.3, r.truth.se_diff_at
    assert r.truth.se_diff_forecast < r.truth.se_diff_at[-1]  # the second order explains part of the rest
    assert r.truth.reliable and r.truth.ess > 0.5 * 32 * 4


@pytest.mark.parametrize("entropy", ["token", "sequence-sum"])
def test_measure_change_after_a_real_step_is_the_functional_truth(entropy):
    """AdamW with warm state, the caller's own clipped loss: ``measure_change`` after ``optimizer.step()``
    re-evaluates E at the really stepped parameters, the truth at ``theta + lr v`` functionally; they
    agree up to the fp32 rounding of theta'. The caller's state is unchanged by both calls."""
    model, opt = setup(Case("AdamW", 3, 2))
    functional = (
        dict(entropy="token") if entropy == "token" else dict(entropy="sequence", entropy_weighting="sum")
    )
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step", **functional))
    E = random_batch(6, group_size=3, seed=11)
    before = snapshot(model, opt)
    result = probe.run(eval_batch=E, from_grad=True, truth=True)
    assert_unchanged(before, model, opt)
    opt.step()
    before = snapshot(model, opt)
    measured = probe.measure_change(result)
    assert_unchanged(before, model, opt)
    assert measured.delta_h != 0.0 and abs(measured.delta_h) > 3 * measured.se * 1e-3
    assert abs(measured.delta_h - result.truth.delta_h) < 1e-6
    assert abs(measured.se - result.truth.se) < 1e-6 and abs(measured.ess - result.truth.ess) < 1e-4
    assert abs(measured.se_diff - result.truth.se_diff) < 1e-6


def test_token_truth_of_a_tiny_lm_at_alpha_zero_is_exactly_zero():
    model = TinyLM(seed=2)
    cfg = ep.ProbeConfig(
        entropy="token", lr=0.1, direction="sgd", truth_alphas=(0.0, 1.0), unconditional_se=False
    )
    U, E = random_batch(4, seed=3), random_batch(5, group_size=[2, 3, 4, 3, 2], seed=4)
    t = ep.EntropyProbe(model, config=cfg).run(U, E, truth=True).truth
    assert t.delta_h_at[0] == 0.0 and t.se_at[0] == 0.0 and t.ess_at[0] == E.n_sequences
    assert t.delta_h_at[1] != 0.0


def test_bf16_token_truth_sees_steps_below_the_rounding_and_tends_to_the_forecast(monkeypatch):
    """A bf16 GPT-2 at steps too small for most bf16 entries to move: the token truth evaluates theta' in
    fp32 (``truth.full_precision_state``), so at every alpha it is within K_SE of its se_diff of alpha
    delta_h1; stepped in bf16 instead (the patched path) it misses by many of them at the smallest alpha:
    the test can fail. The alphas stop at 1/64: at 1/16 the truth / alpha has moved by 20% from 1/256 (the
    second-order term), which the exact forward-mode derivative of the default engine shows at 7 SEs."""
    from core_support import tiny_gpt2

    import entropy_probe.token_truth as token_truth_module

    vocab, lr, alphas = 11, 1e-2, (1 / 1024, 1 / 256, 1 / 64)
    model = tiny_gpt2(seed=0, vocab=vocab).to(torch.bfloat16)
    U = random_batch(8, group_size=4, vocab=vocab, seed=1)
    E = random_batch(32, group_size=4, vocab=vocab, seed=2)
    cfg = ep.ProbeConfig(entropy="token", lr=lr, direction="sgd", truth_alphas=alphas, unconditional_se=False)
    probe = ep.EntropyProbe(model, config=cfg)
    v = probe.update_direction(U)
    result = probe.run(eval_batch=E, direction=v, truth=True)
    t = result.truth
    for alpha, got, se_diff in zip(alphas, t.delta_h_at, t.se_diff_at):
        assert abs(got - alpha * result.delta_h1) <= K_SE * se_diff, (alpha, got, alpha * result.delta_h1)
    monkeypatch.setattr(token_truth_module, "full_precision_state", lambda module, params: None)
    rounded = probe.run(eval_batch=E, direction=v, truth=True).truth.delta_h_at[1]  # alpha 1/256
    assert abs(rounded - alphas[1] * result.delta_h1) > 10 * K_SE * t.se_diff_at[1]


def test_bf16_forward_mode_derivative_is_the_fp32_one_of_the_same_values():
    """On a bf16 model the default engine's delta_h1 is the fp32 derivative of the function the bf16 values
    represent (a second route: the same values cast to an fp32 model, where both engines agree to 1e-5),
    to bf16 rounding of the forward-mode pass (measured 0.26%; allowed 2%, five bf16 roundings of 2^-8:
    a deterministic bound on rounding, not a statistical one; the 39% below fails it). The backward engine's
    reverse pass rounds every gradient to bf16 and lands 39% away on this model (not asserted)."""
    import copy

    from core_support import tiny_gpt2

    vocab = 11
    model = tiny_gpt2(seed=0, vocab=vocab).to(torch.bfloat16)
    as_fp32 = copy.deepcopy(model).float()  # the same values, in fp32
    E = random_batch(32, group_size=4, vocab=vocab, seed=2)
    gen = torch.Generator().manual_seed(3)
    v = {n: torch.randn(p.shape, generator=gen) for n, p in as_fp32.named_parameters()}
    cfg = ep.ProbeConfig(entropy="token", lr=1e-2, direction="sgd", unconditional_se=False, lookahead="never")
    reference = ep.EntropyProbe(as_fp32, config=cfg).run(eval_batch=E, direction=v)
    backward = ep.EntropyProbe(as_fp32, config=dataclasses.replace(cfg, engine="backward"))
    assert reference.delta_h1 == pytest.approx(backward.run(eval_batch=E, direction=v).delta_h1, rel=1e-5)
    got = ep.EntropyProbe(model, config=cfg).run(eval_batch=E, direction=v)
    assert got.delta_h1 == pytest.approx(reference.delta_h1, rel=2e-2)
