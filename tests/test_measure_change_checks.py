"""``measure_change`` refuses what is not its forecast and flags a change whose weights collapsed (DESIGN 21).

- A result made for another model, at another temperature, for another entropy functional, or whose E
  was edited after the forecast is refused with a ``ValueError`` naming the cause, the caller's state
  untouched. Without the check, another model's result "measured" a change of tens of millinats where
  no step was taken (the issue: -0.039 +- 0.016); the same model's result measures exactly 0 then.
- ``MeasuredChange.reliable`` follows the truth's rule (ESS below ``ess_threshold(N)``): a large SGD
  step (lr 3) of an enumerable GPT-2 collapses the weights (ESS 1.06 of 16), warns and is flagged; the
  measured change (+0.034 +- 0.032) is then far from the exact change the step caused (-0.193, by
  enumeration), which is why the flag matters. A small step (lr 1e-3) is not flagged.

Run: ``PYTHONPATH=src pytest -q tests/test_measure_change_checks.py``.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from core_support import TinyLM, random_batch
from large_step_support import EnumerableGPT2
from test_from_grad import assert_unchanged, snapshot

import entropy_probe as ep
from entropy_probe.toy import exact_entropy, sample_enumerated
from entropy_probe.truth import ess_threshold


def _forecast(model, cfg: ep.ProbeConfig, seed: int = 3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ep.policy_loss(model, random_batch(4, seed=seed + 1), ep.ProbeConfig()).backward()
    probe = ep.EntropyProbe(model, opt, cfg)
    return probe, opt, probe.run(eval_batch=random_batch(6, seed=seed), from_grad=True)


def test_another_models_result_is_refused_and_the_own_measures_zero_without_a_step():
    cfg = ep.ProbeConfig(direction="optimizer-step")
    probe_a, _, result_a = _forecast(TinyLM(seed=1), cfg)
    probe_b, opt_b, _ = _forecast(TinyLM(seed=2), cfg)
    assert probe_a.measure_change(result_a).delta_h == 0.0  # no step taken: exactly no change
    before = snapshot(probe_b.model, opt_b)
    with pytest.raises(ValueError, match="made for another model"):
        probe_b.measure_change(result_a)
    assert_unchanged(before, probe_b.model, opt_b)
    # a second probe on the same model (e.g. built anew by a callback) measures the same result
    again = ep.EntropyProbe(probe_a.model, None, dataclasses.replace(cfg, lr=1e-2))
    assert again.measure_change(result_a).delta_h == 0.0


@pytest.mark.parametrize(
    "base, field, value",
    [
        ({}, "temperature", 0.7),
        ({}, "entropy", "sequence"),  # the default, "token", against the per-sequence functional
        ({"entropy": "sequence"}, "entropy_weighting", "sum"),
    ],
    ids=["temperature", "functional", "weighting"],
)
def test_another_temperature_or_functional_is_refused(base, field, value):
    cfg = ep.ProbeConfig(direction="optimizer-step", **base)
    probe, opt, result = _forecast(TinyLM(seed=1), cfg)
    other = ep.EntropyProbe(probe.model, opt, dataclasses.replace(cfg, **{field: value}))
    before = snapshot(probe.model, opt)
    with pytest.raises(ValueError, match=f"ProbeConfig.{field}="):
        other.measure_change(result)
    assert_unchanged(before, probe.model, opt)


def test_an_eval_batch_edited_after_the_forecast_is_refused():
    probe, _, result = _forecast(TinyLM(seed=1), ep.ProbeConfig(direction="optimizer-step"))
    ids = result.eval_state.batch.input_ids
    ids[0, -1] = (ids[0, -1] + 1) % 7  # another response, same shapes
    with pytest.raises(ValueError, match="eval batch has changed since the forecast"):
        probe.measure_change(result)
    with pytest.raises(ValueError, match="eval batch has changed since the forecast"):
        result.eval_state.batch = random_batch(6, seed=99)  # another E altogether
        probe.measure_change(result)


def _sgd_step_measured(lr: float):
    """A real SGD step of the enumerable GPT-2 at ``lr``: (measured change, warnings, exact change, N)."""
    policy = EnumerableGPT2(seed=0)
    update, evaluation = sample_enumerated(policy, 16, seed=1), sample_enumerated(policy, 4, seed=2)
    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    ep.policy_loss(policy, update, ep.ProbeConfig()).backward()
    probe = ep.EntropyProbe(policy, opt, ep.ProbeConfig(entropy="sequence", direction="sgd"))
    result = probe.run(eval_batch=evaluation, from_grad=True)
    with torch.no_grad():
        h0 = float(exact_entropy(policy))
    opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measured = probe.measure_change(result)
    with torch.no_grad():
        exact = float(exact_entropy(policy)) - h0
    return measured, [str(w.message) for w in caught], exact, evaluation.n_sequences


def test_collapsed_weights_are_flagged_with_a_warning_and_a_small_step_is_not():
    big, said, exact, n = _sgd_step_measured(3.0)  # ESS 1.06 of 16
    assert big.reliable is False and big.ess < ess_threshold(n)  # the rule's definition
    assert any("degenerate importance weights" in m for m in said), said
    assert big.to_dict()["entropy_probe/measured/reliable"] is False
    # why: the collapsed estimate is nowhere near the exact change (+0.034 +- 0.032 against -0.193)
    assert abs(big.delta_h - exact) > 5 * big.se
    small, said, exact, n = _sgd_step_measured(1e-3)
    assert small.reliable is True and small.ess >= ess_threshold(n) and not said
