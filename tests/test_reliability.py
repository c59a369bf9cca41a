"""Issue 23: errors that name their cause, and the importance-weight checks of the truth and of
``measure_change`` tested by what they must do (DESIGN section 24).

- a truth at a huge lr, or a real step that diverged, says the STEP is too large (the forecast's own
  pass was finite), and ``measure_change`` names itself, not "truth at alpha";
- a weight ``exp(r)`` that float64 holds (r between 70 and 700 here) is measured, and the truth along
  the step equals ``measure_change`` after it; an unrepresentable one is a ValueError, never inf/NaN.
Run: ``PYTHONPATH=src pytest -q tests/test_reliability.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from core_support import random_batch, tiny_gpt2

import entropy_probe as ep
from entropy_probe.logprobs import sequence_logprobs
from entropy_probe.toy import TabularPolicy, sample_enumerated


def test_truth_at_a_huge_lr_says_the_step_is_too_large():
    model = tiny_gpt2(vocab=11)
    U, E = random_batch(3, vocab=7, seed=1), random_batch(3, vocab=7, seed=2)
    probe = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=1e9, direction="sgd"))
    with pytest.raises(ValueError, match=r"truth at alpha=1\.0: the step is too large .*lr 1e\+09") as info:
        probe.run(U, E, truth=True)
    assert "forecast itself was made at finite logits" in str(info.value)


def test_measure_change_after_a_diverged_step_names_itself():
    model = tiny_gpt2(vocab=11)
    U, E = random_batch(3, vocab=7, seed=1), random_batch(3, vocab=7, seed=2)
    probe = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=1e-2, direction="sgd"))
    result = probe.run(U, E)
    with torch.no_grad():
        model.transformer.wte.weight.fill_(math.inf)  # a step that diverged
    with pytest.raises(ValueError, match=r"^measure_change .*: the step is too large") as info:
        probe.measure_change(result)
    assert "alpha" not in str(info.value)


def _extreme_pair(scale: float):
    """A peaked policy (the forecast's), E drawn from another, and the step to a nearly flat policy:
    E's log-probs rise by up to about 3 * scale nats."""
    policy = TabularPolicy(seed=1, scale=scale)
    E = sample_enumerated(TabularPolicy(seed=0), n_units=8, seed=2)
    flat = TabularPolicy(seed=1, scale=scale * 0.01).table.detach()
    return policy, E, flat


def _max_log_ratio(policy, E, table) -> float:
    """By hand: the largest S_i(theta') - S_i(theta) over E."""
    with torch.no_grad():
        s0 = sequence_logprobs(policy, E, 1.0, "token-mean").seq
        other = TabularPolicy(seed=1)
        other.table.copy_(table)
        s1 = sequence_logprobs(other, E, 1.0, "token-mean").seq
    return float((s1 - s0).max())


def test_large_but_representable_weights_are_measured():
    """Log-weights up to ~125 nats (exp(125) is a fine float64): the truth along the step and
    measure_change after it give the same finite change. A cap below that (e.g. 70) would refuse both."""
    policy, E, flat = _extreme_pair(scale=20.0)
    r = _max_log_ratio(policy, E, flat)
    assert 70 < r < 700, r  # the case this test is about
    lr = 1.0
    v = {"table": (flat - policy.table.detach()) / lr}
    probe = ep.EntropyProbe(policy, config=ep.ProbeConfig(lr=lr, direction="sgd"))
    result = probe.run(eval_batch=E, direction=v, truth=True)
    with torch.no_grad():
        policy.table.copy_(flat)  # the real step
    measured = probe.measure_change(result)
    assert math.isfinite(result.truth.delta_h) and math.isfinite(measured.delta_h)
    assert measured.delta_h == pytest.approx(result.truth.delta_h, rel=1e-6)


def test_unrepresentable_weights_are_an_error_not_a_number():
    """Log-weights beyond float64 (exp(700+) overflows): measure_change refuses, naming itself."""
    policy, E, flat = _extreme_pair(scale=300.0)
    assert _max_log_ratio(policy, E, flat) > 710  # exp() of it is inf in float64
    probe = ep.EntropyProbe(policy, config=ep.ProbeConfig(lr=1e-3, direction="sgd"))
    result = probe.run(eval_batch=E, direction={"table": torch.zeros_like(policy.table)})
    with torch.no_grad():
        policy.table.copy_(flat)
    with pytest.raises(ValueError, match=r"^measure_change .*importance weight of eval sequence \d+ is exp"):
        probe.measure_change(result)


# ---- result.entropy against an independent computation; the bootstrap on tiny B_E -------------------
def test_result_entropy_is_the_mean_unit_entropy_by_hand():
    """entropy = mean over E units of -(1/G) sum_i S_w,i, S_w from a hand-written log_softmax + gather."""
    from core_support import TinyLM, hand_token_logprobs

    model = TinyLM(seed=0)
    E = random_batch(5, group_size=[2, 3, 4, 3, 2], seed=2)
    for weighting in ("token-mean", "sum"):
        cfg = ep.ProbeConfig(entropy="sequence", lr=1e-2, direction="sgd", entropy_weighting=weighting)
        r = ep.EntropyProbe(model, config=cfg).run(random_batch(3, seed=1), E)
        with torch.no_grad():
            lp = hand_token_logprobs(model, E).double()  # (N, T)
        m = E.response_mask.double()
        w = m / m.sum(dim=1, keepdim=True) if weighting == "token-mean" else m
        s_w = (lp * w).sum(dim=1)  # (N,)
        units = [-s_w[E.unit_index == u].mean() for u in range(E.n_units)]
        assert r.entropy == pytest.approx(float(torch.stack(units).mean()), rel=1e-6)


@pytest.mark.parametrize("b", [3, 4])
def test_bootstrap_interval_is_finite_on_tiny_samples(b):
    """With B_E = 3 or 4 many resamples draw one unit B times (se* = 0): they carry no t and must be
    dropped, else the quantiles are NaN."""
    from entropy_probe.statistics import bootstrap_t_interval

    s = torch.tensor([0.3, -1.2, 2.0, 0.7][:b], dtype=torch.float64)
    lo, hi = bootstrap_t_interval(s, lr=0.5, level=0.9)
    assert math.isfinite(lo) and math.isfinite(hi) and lo < 0.5 * float(s.mean()) < hi
