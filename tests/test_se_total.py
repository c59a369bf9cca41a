"""se_total and the update influences (DESIGN sections 13-14), measured against their definitions.

- Calibration, the real property: over 200 independent (U, E) pairs on the enumerable policy,
  ``var(delta_h1) / mean(se_total^2)`` lies in its chi-square band (kurtosis-widened) for sgd, Adam
  preconditioning fresh and warm, and the warm optimizer step with clipping. The old V_Y term gave
  0.000 (fresh Adam) and 0.60 (warm Adam) here.
- Influences by a second route: for sgd ``eta Xbar_E . Y_m / B_U`` with Y_m from a real backward of the
  policy loss restricted to unit m; for the Adam directions ``delta_h1 - eta Xbar_E . v_(-m)`` with
  v_(-m) from ``update_direction`` on U without unit m (the whole direction map rerun).
"""

from __future__ import annotations

import pytest
import torch

import entropy_probe as ep
from entropy_probe.loss import policy_loss
from entropy_probe.toy import TabularPolicy, sample_enumerated
from entropy_probe.validation.calibration import (
    SE_TOTAL_CASES,
    se_total_check,
    se_total_pairs,
)
from entropy_probe.validation.checks import variance_check
from entropy_probe.validation.stats import excess_kurtosis, tolerance_k


@pytest.mark.parametrize("direction,warm", SE_TOTAL_CASES)
def test_se_total_is_calibrated_over_independent_update_and_eval_batches(direction, warm):
    data = se_total_pairs(direction, warm, n_pairs=200, update_units=8, eval_units=16, seed=0)
    # k: two-sided 1% family-wise over the four cases; the band is chi-square(df) with df from the
    # kurtosis of delta_h1, widened for the SE of the mean predicted variance (checks.variance_check).
    check = se_total_check(direction, warm, data, k=tolerance_k(len(SE_TOTAL_CASES)))
    print(check.name, check.measured, check.tolerance)
    assert check.passed, (check.measured, check.tolerance)


def _update_batch(policy, n_units: int, seed: int) -> ep.RolloutBatch:
    """U with random advantages given: dropping a unit leaves the other units' advantages alone."""
    b = sample_enumerated(policy, n_units, seed=seed)
    adv = torch.randn(b.n_sequences, generator=torch.Generator().manual_seed(seed))
    return ep.RolloutBatch(b.input_ids, b.attention_mask, b.response_mask, b.group_ids, advantages=adv)


def test_sgd_update_influences_are_the_per_unit_terms_and_sum_to_delta_h1():
    policy = TabularPolicy(seed=1)
    cfg = ep.ProbeConfig(entropy="sequence", lr=0.05, direction="sgd")
    probe = ep.EntropyProbe(policy, config=cfg)
    update, evaluation = _update_batch(policy, 6, seed=3), sample_enumerated(policy, 10, seed=4)
    r = probe.run(update, evaluation)
    n = update.n_units
    for m in range(n):
        only_m = update.advantages * (update.unit_index == m)  # J restricted to unit m, same normalisers
        b = ep.RolloutBatch(
            update.input_ids, update.attention_mask, update.response_mask, update.group_ids, advantages=only_m
        )
        (grad,) = torch.autograd.grad(policy_loss(policy, b, cfg), [policy.table])
        y_m = {"table": -n * grad}  # Y_m = grad J_m = -B_U grad of the loss restricted to unit m
        expected = probe.run(eval_batch=evaluation, direction=y_m).delta_h1 / n  # eta Xbar_E . Y_m / B_U
        assert float(r.update_influence[m]) == pytest.approx(expected, rel=1e-4, abs=1e-6 * abs(r.delta_h1))
    assert float(r.update_influence.sum()) == pytest.approx(r.delta_h1, rel=1e-5)
    assert r.update_unit_ids.tolist() == update.unit_ids.tolist()


@pytest.mark.parametrize("direction,clip", [("adam-preconditioned", None), ("optimizer-step", 0.3)])
def test_adam_update_influences_are_delete_one_unit_changes(direction, clip):
    policy = TabularPolicy(seed=2)
    # eps 1e-4: a few table entries get |g| ~ 1e-9 of pure fp32 rounding (their terms cancel), where a fresh
    # Adam's g / (|g| + 1e-8) is +-1 by the rounding of each summation order; 1e-4 keeps them ~1e-5.
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.03, weight_decay=0.01, eps=1e-4)
    if direction == "optimizer-step":  # warm: momentum and second moment from two real steps
        for k in range(2):
            optimizer.zero_grad()
            policy_loss(policy, sample_enumerated(policy, 8, seed=50 + k), ep.ProbeConfig()).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    probe = ep.EntropyProbe(
        policy, optimizer, ep.ProbeConfig(entropy="sequence", direction=direction, max_grad_norm=clip)
    )
    update, evaluation = _update_batch(policy, 5, seed=5), sample_enumerated(policy, 12, seed=6)
    r = probe.run(update, evaluation)
    for m in range(update.n_units):  # every unit has G = 4, so dropping one leaves J_m of the others alone
        v_minus = probe.update_direction(_without_units(update, [m]))
        expected = r.delta_h1 - probe.run(eval_batch=evaluation, direction=v_minus).delta_h1
        assert float(r.update_influence[m]) == pytest.approx(expected, rel=1e-3, abs=1e-5 * abs(r.delta_h1))


def test_one_update_unit_warns_and_one_eval_unit_still_gives_finite_numbers():
    policy = TabularPolicy(seed=3)
    probe = ep.EntropyProbe(policy, config=ep.ProbeConfig(entropy="sequence", lr=0.05, direction="sgd"))
    with pytest.warns(RuntimeWarning, match="fewer than 2 update units"):
        r = probe.run(sample_enumerated(policy, 1, seed=1), sample_enumerated(policy, 6, seed=2))
    assert r.se_total == r.se_cond_e and r.var_update == 0.0  # no variance over U can be estimated
    assert r.update_influence.tolist() == [r.delta_h1]  # the one unit is the whole step
    with pytest.warns(RuntimeWarning, match="fewer than 2 units"):  # B_E = 1: SE over E is 0
        r = probe.run(sample_enumerated(policy, 5, seed=1), sample_enumerated(policy, 1, seed=3))
    # no second half of E: both projections use Xbar_E (V_U then keeps E's noise, on the large side)
    assert r.delta_h1 != 0 and r.se_cond_e == 0.0 and r.var_update > 0 and r.se_total > 0
    assert torch.isfinite(r.update_influence).all()


def _without_units(batch: ep.RolloutBatch, units: list[int]) -> ep.RolloutBatch:
    keep = ~torch.isin(batch.unit_index, torch.tensor(units))
    return ep.RolloutBatch(
        batch.input_ids[keep],
        batch.attention_mask[keep],
        batch.response_mask[keep],
        batch.group_ids[keep],
        advantages=batch.advantages[keep],
    )


@pytest.mark.parametrize("direction,clip", [("adam-preconditioned", None), ("optimizer-step", 0.3)])
def test_var_update_is_the_delete_a_group_jackknife_of_the_rerun_direction_map(direction, clip):
    """Second route for V_U of the non-linear rules (update_groups): each group's v_(-k) from
    ``update_direction`` on U without the group's units (the whole map rerun), projected on the halves
    of E kept in the result, and the delete-a-group formula written out here."""
    policy = TabularPolicy(seed=2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.03, weight_decay=0.01, eps=1e-4)  # eps: above
    cfg = ep.ProbeConfig(direction=direction, max_grad_norm=clip, keep_halves=True)
    probe = ep.EntropyProbe(policy, optimizer, cfg)
    update, evaluation = _update_batch(policy, 6, seed=7), sample_enumerated(policy, 12, seed=8)
    r = probe.run(update, evaluation)
    x_a, x_b = r.halves.x_a["table"].double(), r.halves.x_b["table"].double()
    v = probe.update_direction(update)["table"].double()
    groups = [[0, 1], [2], [3, 4], [5]]  # B_U = 6 in 4 contiguous blocks: position p in group 4p // 6
    a, b = [], []
    for units in groups:
        dv = probe.update_direction(_without_units(update, units))["table"].double() - v
        a.append(float((x_a * dv).sum())), b.append(float((x_b * dv).sum()))
    n, d = 6, [len(g) for g in groups]
    rest = [n - dk for dk in d]
    abar = sum(r_ * x for r_, x in zip(rest, a)) / sum(rest)  # weighted by the units each replicate keeps
    bbar = sum(r_ * x for r_, x in zip(rest, b)) / sum(rest)
    expected = probe.lr**2 * sum(
        (n - dk) ** 2 / (dk * n * 3) * (ak - abar) * (bk - bbar) for dk, ak, bk in zip(d, a, b)
    )
    assert r.var_update == pytest.approx(expected, rel=1e-3, abs=1e-6 * abs(expected))
    assert r.se_total == pytest.approx((r.var_cond_e + max(r.var_update, 0.0)) ** 0.5, rel=1e-12)


def _var_update_against_exact(policy, optimizer, cfg: ep.ProbeConfig, n_draws: int, seed: int):
    """Over ``n_draws`` independent U: ``eta grad H . v(U)`` with the exact grad H (enumeration) and V_U
    from ``update_variance`` given that grad H as both halves of E (no E noise, var_cond_e = 0)."""
    from types import SimpleNamespace

    from entropy_probe.toy import exact_entropy
    from entropy_probe.update_jackknife import EvalHalves, update_variance

    probe = ep.EntropyProbe(policy, optimizer, cfg)
    (grad_h,) = torch.autograd.grad(exact_entropy(policy, cfg.entropy_weighting), [policy.table])
    exact = {"table": grad_h.detach()}
    halves, no_e = EvalHalves(exact, exact, (1, 1)), SimpleNamespace(var_cond_e=0.0, delta_h1=0.0)
    forecast, var_update = [], []
    for k in range(n_draws):
        call = probe._call()
        upd = probe._direction_from(call, sample_enumerated(policy, 8, seed=seed + k), keep_grad=True)
        forecast.append(call.lr * float((grad_h.double() * upd.v["table"].double()).sum()))
        var_update.append(update_variance(call, upd, halves, no_e).var_update)
    return forecast, var_update


@pytest.mark.parametrize("direction,warm", [("adam-preconditioned", 0), ("adam-preconditioned", 3)])
def test_var_update_is_the_variance_over_u_on_an_unseen_policy(direction, warm):
    """Issue 23: through a fresh Adam (v ~ sign(g)) the delete-one jackknife gave 1.3-1.7x the variance
    over U (here a ratio of 0.72 with it, outside the band); the delete-a-group V_U must not. 300
    independent U on a policy used neither to choose the estimator (seeds 1-4) nor by the benchmark
    (5, 9): seed 13, scale 0.7.
    The exact grad H stands for X, so the ratio measures V_U alone."""
    policy = TabularPolicy(seed=13, scale=0.7)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.03, weight_decay=0.01)
    for k in range(warm):  # warm: moments from real AdamW steps
        optimizer.zero_grad()
        policy_loss(policy, sample_enumerated(policy, 8, seed=600 + k), ep.ProbeConfig()).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    cfg = ep.ProbeConfig(lr=0.03, direction=direction)
    forecast, var_update = _var_update_against_exact(policy, optimizer, cfg, 300, seed=13_000)
    # the band: chi-square(df) for var(forecast) over 300 draws, df from their kurtosis, widened for the
    # SE of mean(var_update) (checks.variance_check, one "unit" per draw); k two-sided 1% over both cases
    check = variance_check("V_U", forecast, var_update, excess_kurtosis(forecast), 1, tolerance_k(2))
    print(direction, warm, check.measured, check.tolerance)
    assert check.passed, (check.measured, check.tolerance)


# ---- issue 23: the DDP path of the jackknife over U, in this module's own tests -----------------------
def _se_total_two_ranks(rank: int, world: int) -> None:
    from test_distributed import _share
    from torch.nn.parallel import DistributedDataParallel as DDP

    policy = TabularPolicy(seed=3, scale=0.7)
    U = sample_enumerated(policy, n_units=4, group_size=3, seed=11)
    E = sample_enumerated(policy, n_units=5, group_size=3, seed=12)
    # the backward engine: one pass per unit whatever the split (the jvp engine's half sums are formed per
    # microbatch, whose make-up depends on the split: fp32 reassociation, 2e-6 of var_update measured)
    cfg = ep.ProbeConfig(lr=0.05, direction="sgd", engine="backward")
    # E split 1 + 4: rank 1's units sit at odd global offsets, so the halves A/B of E depend on it
    got = ep.EntropyProbe(DDP(policy), config=cfg).run(
        _share(U, [[0, 1], [2, 3]][rank]), _share(E, [[0], [1, 2, 3, 4]][rank])
    )
    want = ep.EntropyProbe(policy, config=cfg).run(U, E)
    for k in ("delta_h1", "se_cond_e", "var_update", "se_total"):
        a, b = getattr(got, k), getattr(want, k)
        assert abs(a - b) <= 1e-6 * abs(b), f"{k}: 2 ranks {a!r} vs 1 process {b!r}"
    torch.testing.assert_close(got.update_influence, want.update_influence, rtol=1e-6, atol=1e-12)


def test_se_total_on_two_ranks_equals_one_process():
    """The DDP path of update_jackknife (halves of E by GLOBAL position, gathered influences) on 2 gloo
    ranks with an uneven E split equals one process to 1e-6."""
    from test_distributed import _launch

    _launch(_se_total_two_ranks)


def _grouped_two_ranks(rank: int, world: int) -> None:
    from test_distributed import _share
    from torch.nn.parallel import DistributedDataParallel as DDP

    policy = TabularPolicy(seed=4, scale=0.7)
    U = sample_enumerated(policy, n_units=6, group_size=3, seed=21)
    E = sample_enumerated(policy, n_units=5, group_size=3, seed=22)
    cfg = ep.ProbeConfig(lr=0.05, direction="adam-preconditioned")  # fresh: v ~ sign(g), V_U by groups
    # eps 1e-4: entries whose terms cancel get |g| ~ 1e-9 of fp32 rounding, which the two summation orders
    # (all-reduce, one process) round differently; 1e-8 would make their sign(g) differ (test above)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05, eps=1e-4)
    # U split 1 + 5: group 0 = positions {0, 1} spans both ranks, rank 1 holds groups 0-3 and rank 0
    # none after 0, so the group sums must be all-reduced by global position
    got = ep.EntropyProbe(DDP(policy), optimizer, cfg).run(
        _share(U, [[0], [1, 2, 3, 4, 5]][rank]), _share(E, [[0, 1, 2], [3, 4]][rank])
    )
    want = ep.EntropyProbe(policy, optimizer, cfg).run(U, E)
    for k in ("delta_h1", "se_cond_e", "var_update", "se_total"):
        a, b = getattr(got, k), getattr(want, k)
        assert abs(a - b) <= 1e-6 * abs(b), f"{k}: 2 ranks {a!r} vs 1 process {b!r}"
    assert want.var_update != 0.0
    # rtol 1e-5: grad J_U summed in another order (per rank, then all-reduced) differs by fp32 rounding,
    # ~1e-7 relative, which g / (|g| + eps) amplifies where |g| ~ eps (measured 1.5e-6); a unit or rank
    # order mix-up moves an influence by O(1) relative
    torch.testing.assert_close(got.update_influence, want.update_influence, rtol=1e-5, atol=1e-12)


def test_grouped_var_update_on_two_ranks_equals_one_process():
    """The delete-a-group V_U (update_groups) on 2 gloo ranks, a group spanning the ranks, equals one
    process to 1e-6: the groups are blocks of the GLOBAL U order and their gradient sums all-reduced."""
    from test_distributed import _launch

    _launch(_grouped_two_ranks)
