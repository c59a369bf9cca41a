"""``ProbeConfig(entropy="token")`` through ``EntropyProbe.run``: against exact enumeration, both engines,
by_group, se_total, the trainers' entropy formula, the caller's state, and the options that do not apply.

Run: ``PYTHONPATH=src pytest -q tests/test_token_forecast.py``.
"""

from __future__ import annotations

import pytest
import torch
from core_support import random_batch, tiny_gpt2
from test_token_engines import trainer_entropy

import entropy_probe as ep
from entropy_probe.toy import (
    TabularPolicy,
    exact_directional_derivative,
    exact_token_derivative,
    sample_enumerated,
)

ETA = 1e-2


def toy_trainer_entropy(policy: TabularPolicy, batch) -> float:
    """sum(m H_t) / sum(m) over the batch's rows, with H_t from log_softmax written out here (float64)."""
    with torch.no_grad():
        logits = policy(batch.input_ids, batch.attention_mask).double()[:, :-1]  # (N, T-1, V)
    logp = torch.log_softmax(logits, dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    m = batch.response_mask[:, 1:].double()
    return float((h * m).sum() / m.sum())


@pytest.fixture(scope="module")
def toy():
    policy = TabularPolicy(seed=0)
    update = sample_enumerated(policy, 16, seed=1)
    evaluation = sample_enumerated(policy, 500, seed=2)
    return policy, update, evaluation


def test_unbiased_against_enumeration_and_engines_agree(toy):
    """One call on 500 exactly sampled E units lands within 4 of its SEs of eta * grad H_tok . v, both
    engines give the same numbers, and result.entropy is the trainers' formula on E."""
    policy, update, evaluation = toy
    results = {}
    for engine in ("backward", "jvp"):
        cfg = ep.ProbeConfig(lr=ETA, direction="sgd", entropy="token", engine=engine)
        results[engine] = ep.EntropyProbe(policy, config=cfg).run(update, evaluation)
    v = ep.EntropyProbe(policy, config=ep.ProbeConfig(lr=ETA, direction="sgd")).update_direction(update)
    exact = ETA * exact_token_derivative(policy, v)
    r = results["backward"]
    assert abs(r.delta_h1 - exact) <= 4 * r.se_cond_e, (r.delta_h1, exact, r.se_cond_e)  # 4 SE
    assert abs(exact) > 6 * r.se_cond_e  # far from 0: an estimator stuck at 0 fails
    j = results["jvp"]
    assert abs(j.delta_h1 - r.delta_h1) <= 1e-5 * abs(r.delta_h1)
    assert abs(j.se_cond_e - r.se_cond_e) <= 1e-4 * r.se_cond_e
    torch.testing.assert_close(j.per_unit, r.per_unit, rtol=1e-4, atol=1e-9)
    want = toy_trainer_entropy(policy, evaluation)
    assert abs(r.entropy - want) <= 1e-6 * want and abs(j.entropy - want) <= 1e-6 * want
    assert (
        r.se_total is not None
        and r.se_total >= r.se_cond_e
        and j.se_total == pytest.approx(r.se_total, rel=1e-4)
    )
    assert r.by_group is not None
    assert abs(sum(g[0] for g in r.by_group.values()) - r.delta_h1) <= 1e-12 + 1e-9 * abs(r.delta_h1)


def test_gpt2_entropy_is_the_trainers_formula_and_groups_add_up():
    model = tiny_gpt2(seed=3, vocab=11)
    batch = random_batch(5, group_size=[2, 3, 4, 2, 3], vocab=11, seed=4)
    cfg = ep.ProbeConfig(lr=1e-3, direction="sgd", temperature=0.8, by_group=True)
    assert cfg.entropy == "token"  # the default
    r = ep.EntropyProbe(model, config=cfg).run(batch, batch)
    want = trainer_entropy(model, batch, 0.8)
    assert abs(r.entropy - want) <= 1e-6 * want, (r.entropy, want)
    parts = sum(g[0] for g in r.by_group.values())
    assert len(r.by_group) >= 3 and abs(parts - r.delta_h1) <= 1e-9 * abs(r.delta_h1) + 1e-15


def test_caller_state_is_unchanged():
    model = tiny_gpt2(seed=5, vocab=11).train()
    batch = random_batch(3, vocab=11, seed=6)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    ep.EntropyProbe(model, opt, ep.ProbeConfig(entropy="token")).run(batch, batch)
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.grad is None, n


@pytest.mark.parametrize("field, value", [("entropy_weighting", "sum"), ("x_estimator", "seed")])
def test_options_that_do_not_apply_name_both_fields(field, value):
    with pytest.raises(ValueError, match=rf"ProbeConfig\.{field}.*ProbeConfig\.entropy='token'"):
        ep.ProbeConfig(entropy="token", **{field: value})
    with pytest.raises(ValueError, match=rf"ProbeConfig\.{field}.*ProbeConfig\.entropy='token'"):
        ep.ProbeConfig(**{field: value})  # the default is "token": the option alone is refused, naming both
    ep.ProbeConfig(entropy="sequence", **{field: value})  # fine for the sequence functionals
    with pytest.raises(ValueError, match="ProbeConfig.entropy: must be one of"):
        ep.ProbeConfig(entropy="tokens")


def test_sequence_sum_reads_the_exact_entropies(toy):
    """entropy="sequence", "sum": the same numerator (E[sum_t H_t] = E[-S]), no ratio, so delta_h1 is unbiased
    for the sequence entropy's change (exact enumeration); result.entropy keeps its definition, the mean over
    units of -(1/G) sum_i S_i."""
    policy, update, _ = toy
    evaluation = sample_enumerated(policy, 400, seed=4)
    cfg = ep.ProbeConfig(lr=ETA, direction="sgd", entropy="sequence", entropy_weighting="sum")
    r = ep.EntropyProbe(policy, config=cfg).run(update, evaluation)
    v = ep.EntropyProbe(policy, config=cfg).update_direction(update)
    exact = ETA * exact_directional_derivative(policy, v, "sum")
    assert abs(r.delta_h1 - exact) <= 4 * r.se_cond_e, (r.delta_h1, exact, r.se_cond_e)  # 4 SE
    with torch.no_grad():
        logits = policy(evaluation.input_ids, evaluation.attention_mask).double()[:, :-1]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, evaluation.input_ids[:, 1:, None]).squeeze(-1)
    s = (logp * evaluation.response_mask[:, 1:].double()).sum(1)  # (N,) S_i
    want = float(-s.reshape(400, 4).mean(1).mean())  # sample_enumerated: 4 consecutive rows per unit
    assert abs(r.entropy - want) <= 1e-6 * want
