"""Advantages, loss aggregations and the entropy-gradient coefficients against numpy by hand.

Run: ``PYTHONPATH=src pytest -q tests/test_core_objectives.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_support import hand_objective, numpy_advantages, random_batch, units_of

import entropy_probe as ep
from entropy_probe import RolloutBatch
from entropy_probe.objectives import (
    LOSS_AGGREGATIONS,
    UpdateTotals,
    advantages,
    entropy_gradient_coefficients,
    policy_gradient_coefficients,
    unit_entropy,
)

# unequal group sizes, ties within units (rewards in {0, 0.5, 1}), group ids not in order
BATCH_SIZES = [2, 3, 5, 4]


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "dr-grpo", "given"])
def test_advantages_match_numpy(estimator):
    batch = random_batch(4, group_size=BATCH_SIZES, seed=11, advantages=estimator == "given")
    got = advantages(batch, estimator).double().numpy()
    np.testing.assert_allclose(got, numpy_advantages(batch, estimator), rtol=1e-6, atol=1e-7)


def test_default_estimator_is_given_with_advantages_else_grpo():
    with_adv = random_batch(3, seed=1, advantages=True)
    with_rewards = random_batch(3, seed=1)
    assert torch.equal(advantages(with_adv, None), with_adv.advantages)
    np.testing.assert_allclose(
        advantages(with_rewards, None).numpy(), numpy_advantages(with_rewards, "grpo"), rtol=1e-6, atol=1e-7
    )


def test_grpo_of_a_tied_unit_is_exactly_zero():
    """All rewards equal within a unit: the centred rewards are exactly 0, whatever the eps."""
    ids = torch.tensor([[1, 2, 3]] * 4)
    ones = torch.ones_like(ids)
    resp = torch.tensor([[0, 1, 1]] * 4)
    batch = RolloutBatch(
        ids, ones, resp, torch.tensor([5, 5, 9, 9]), rewards=torch.tensor([0.7, 0.7, 1.0, 0.0])
    )
    a = advantages(batch, "grpo")
    assert a[0] == 0 and a[1] == 0 and a[2] > 0 > a[3]


@pytest.mark.parametrize("norm_length", [None, 9])
@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_policy_gradient_coefficients_reproduce_each_loss(aggregation, norm_length):
    """``sum_i c_i S_i / B_U`` equals J_U as TRL/verl write the loss (per token, response mask)."""
    batch = random_batch(4, group_size=BATCH_SIZES, seed=12)
    adv = numpy_advantages(batch, "grpo")
    lp = -torch.rand(
        batch.input_ids.shape, generator=torch.Generator().manual_seed(0)
    )  # (N, T) token log-probs
    lp = lp * batch.response_mask
    if aggregation == "seq-mean-token-sum-norm" and norm_length is None:  # TRL's constant is required
        with pytest.raises(ValueError, match="norm_length"):
            policy_gradient_coefficients(
                batch, torch.tensor(adv, dtype=torch.float32), aggregation, UpdateTotals.of(batch), None
            )
        return
    c = policy_gradient_coefficients(
        batch, torch.tensor(adv, dtype=torch.float32), aggregation, UpdateTotals.of(batch), norm_length
    )
    s = lp.sum(1)  # S_i
    j_core = float((c.double() * s.double()).sum()) / batch.n_units
    j_hand = float(
        hand_objective(
            lp, batch, adv, aggregation, norm_length if aggregation == "seq-mean-token-sum-norm" else None
        )
    )
    assert j_core == pytest.approx(j_hand, rel=1e-6)
    # J_m is a plain sum over the unit's rows, and J_U is the mean of the J_m
    j_units = [float((c[rows].double() * s[rows].double()).sum()) for rows in units_of(batch)]
    assert np.mean(j_units) == pytest.approx(j_hand, rel=1e-6)


@pytest.mark.parametrize("estimator", ["unbiased", "seed"])
def test_entropy_gradient_coefficients_by_hand(estimator):
    """a_i = -(S_w,i - mean_{j != i} S_w,j) / G, e_i = -1/G (unbiased) or 0 (the note's L_X)."""
    batch = random_batch(4, group_size=BATCH_SIZES, seed=13)
    sw = torch.randn(batch.n_sequences, dtype=torch.float32, requires_grad=True)
    a, e = entropy_gradient_coefficients(sw, batch, estimator)
    assert not a.requires_grad  # the score-function coefficient is a constant
    x = sw.detach().double().numpy()
    for rows in units_of(batch):
        g = len(rows)
        for i in rows:
            b_i = np.mean([x[j] for j in rows if j != i])
            assert float(a[i]) == pytest.approx(-(x[i] - b_i) / g, rel=1e-5, abs=1e-7)
            assert float(e[i]) == pytest.approx(-1.0 / g if estimator == "unbiased" else 0.0, rel=1e-7)


def test_seed_coefficients_are_the_notes_loss():
    """With equal G the note's ``L_X = -mean(detach(S_w - S_w^LOO) * S)`` has coefficients a_i."""
    batch = random_batch(1, group_size=4, seed=14)
    sw = torch.randn(4)
    s = torch.randn(4, requires_grad=True)
    loo = (sw.sum() - sw) / 3
    note = -((sw - loo) * s).mean()
    a, _ = entropy_gradient_coefficients(sw, batch, "seed")
    torch.testing.assert_close(torch.autograd.grad(note, s)[0], a)


def test_unit_entropy_by_hand():
    batch = random_batch(4, group_size=BATCH_SIZES, seed=15)
    sw = torch.randn(batch.n_sequences)
    got = unit_entropy(sw, batch)
    expected = [-float(sw[rows].mean()) for rows in units_of(batch)]
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_grpo_advantages_and_dr_grpo_normaliser_are_trl_s():
    """TRL 1.16 GRPOTrainer: A = (r - mean_group) / (nanstd_group + 1e-4) (scale_rewards="group"), and the
    dr_grpo loss sum_i A_i S_i / (N * max_completion_length); written here from TRL's own nanstd."""
    from trl.trainer.utils import nanstd

    g = 4
    rewards = torch.tensor([0.50, 0.51, 0.52, 0.50, 1.0, 0.0, 0.0, 1.0])  # a unit with std 0.01: eps matters
    ids = torch.tensor([[5, 1, 2, 3]] * 8)
    resp = torch.tensor([[0, 1, 1, 1]] * 4 + [[0, 1, 0, 0]] * 4)
    groups = torch.arange(2).repeat_interleave(g)
    batch = RolloutBatch(ids, torch.ones_like(ids), resp, groups, rewards=rewards)
    grouped = rewards.view(-1, g)  # TRL's (groups, num_generations) view
    std = nanstd(grouped, dim=1).repeat_interleave(g)
    trl_adv = (rewards - grouped.mean(dim=1).repeat_interleave(g)) / (std + 1e-4)
    # fp32 rounding only; with eps 1e-6 the std-0.01 unit would be off by 1%
    torch.testing.assert_close(advantages(batch, "grpo"), trl_adv, rtol=1e-6, atol=1e-7)

    max_completion_length = 16
    c = policy_gradient_coefficients(
        batch, trl_adv, "seq-mean-token-sum-norm", UpdateTotals.of(batch), max_completion_length
    )
    # TRL: loss = (per_token_loss * mask).sum() / (N * max_completion_length); J_U = sum_i c_i S_i / B_U
    torch.testing.assert_close(c / batch.n_units, trl_adv / (batch.n_sequences * max_completion_length))
    with pytest.raises(ValueError, match="norm_length"):
        ep.ProbeConfig(loss_aggregation="seq-mean-token-sum-norm")  # no silent "longest response of U"
