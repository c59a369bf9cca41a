"""``ProbeConfig(second_order=True, by_group=False)`` through the exact H_t: one nested forward-mode pass
gives the s_n and the q_n (``ProbeConfig.shares_second_order_pass``, ``forecast.shared_token_pass``).

The shared pass must give what the two passes give (the first-order engine's s_n, the second-order pass's
q_n) on the same E, unit by unit, and ``measure_change`` must measure the same change from what it keeps;
the first-order engine must not run. Two models: the exactly enumerable ``TabularPolicy`` and a small
causal LM with left-padded prompts and responses of different lengths (rows of unequal width).

Run: ``PYTHONPATH=src pytest -q tests/test_token_shared_pass.py``.
"""

from __future__ import annotations

import pytest
import torch
from core_support import TinyLM, random_batch

import entropy_probe as ep
import entropy_probe.engines.token as token_engines
from entropy_probe.toy import TabularPolicy, sample_enumerated

T = 0.8


def _tabular():
    policy = TabularPolicy(seed=1, scale=2.0)
    return policy, sample_enumerated(policy, 12, group_size=3, seed=4, temperature=T)


def _tiny_lm():
    return TinyLM(seed=2), random_batch(6, group_size=[2, 3, 4, 3, 2, 5], seed=5)


def _direction(model, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


FUNCTIONALS = [{"entropy": "token"}, {"entropy": "sequence", "entropy_weighting": "sum"}]


@pytest.mark.parametrize("build", [_tabular, _tiny_lm], ids=["tabular", "tiny-lm"])
@pytest.mark.parametrize("functional", FUNCTIONALS, ids=["token", "sequence-sum"])
def test_one_pass_gives_the_two_passes_numbers(build, functional, monkeypatch):
    model, E = build()
    v = _direction(model)
    base = dict(lr=0.05, direction="sgd", second_order=True, temperature=T, lookahead="never", **functional)
    base["engine"] = (
        "backward"  # the two-pass baseline: the backward engine (by_group on), then the nested pass
    )
    shared_cfg, two_cfg = ep.ProbeConfig(**base, by_group=False), ep.ProbeConfig(**base)
    # the backward engine shares only when asked (by_group=False); the jvp default shares (below)
    assert shared_cfg.shares_second_order_pass and not two_cfg.shares_second_order_pass
    jvp_default = ep.ProbeConfig(**{**base, "engine": "jvp"})
    assert jvp_default.shares_second_order_pass and not jvp_default.computes_groups
    two = ep.EntropyProbe(model, config=two_cfg).run(eval_batch=E, direction=v)

    def first_order_engine_runs(*args, **kwargs):
        raise AssertionError("the shared pass ran the first-order engine")

    monkeypatch.setattr(token_engines, "backward_token_projections", first_order_engine_runs)
    monkeypatch.setattr(ep.engines, "backward_token_projections", first_order_engine_runs, raising=False)
    shared = ep.EntropyProbe(model, config=shared_cfg).run(eval_batch=E, direction=v)
    monkeypatch.undo()

    # the same estimator by two routes (fp32 backward engine vs nested jvp): equal to fp32 rounding
    # accumulated through the model (measured up to 1.3e-6 of the largest s_n; allowed 1e-5)
    scale = float(two.first.per_unit.abs().max())
    assert float(two.first.per_unit.std()) > 0.05 * scale  # the units differ: a per-unit mix-up would show
    torch.testing.assert_close(shared.first.per_unit, two.first.per_unit, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(shared.second.per_unit_q, two.second.per_unit_q, rtol=1e-9, atol=0)
    for name in ("delta_h2", "se_delta_h2", "entropy"):
        assert getattr(shared, name) == pytest.approx(getattr(two, name), rel=1e-6), name
    assert shared.se_cond_e == pytest.approx(two.se_cond_e, rel=1e-4)
    assert shared.by_group is None and two.by_group is not None

    # a real step of the parameters, then measure_change from what each result kept
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(v[n], alpha=0.05)
    got = ep.EntropyProbe(model, config=shared_cfg).measure_change(shared)
    want = ep.EntropyProbe(model, config=two_cfg).measure_change(two)
    assert got.delta_h == pytest.approx(want.delta_h, rel=1e-5) and got.delta_h != 0
    assert got.se == pytest.approx(want.se, rel=1e-4)
