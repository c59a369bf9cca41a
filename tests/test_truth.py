"""The truth (DESIGN section 6) against exact enumeration, a real optimizer step and a brute-force jackknife.

Run: ``PYTHONPATH=src python -m pytest -q tests/test_truth.py``.

Statistical assertions compare a seeded estimate with an exact number within k = 4 of its standard
error: two-sided, a correct implementation fails one seed in 16,000, while the errors these tests
guard against (no importance weights, a wrong step, a wrong sign) move the estimate by many SEs.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from core_support import hand_entropy_change

import entropy_probe as ep
from entropy_probe.logprobs import sequence_logprobs
from entropy_probe.toy import TabularPolicy, exact_entropy, sample_enumerated

K_SE = 4.0  # two-sided P(|z| > 4) = 6e-5 for a correct estimator


def _policy(seed: int = 1) -> TabularPolicy:
    return TabularPolicy(seed=seed, scale=2.0)


def _concat(*batches: ep.RolloutBatch) -> ep.RolloutBatch:
    """One batch from several (same width: the enumerated batches all are), group ids kept apart."""
    offset, gids = 0, []
    for b in batches:
        gids.append(b.group_ids + offset)
        offset += int(b.group_ids.max()) + 1
    cat = lambda name: torch.cat([getattr(b, name) for b in batches])  # noqa: E731
    return ep.RolloutBatch(
        cat("input_ids"), cat("attention_mask"), cat("response_mask"), torch.cat(gids), rewards=cat("rewards")
    )


def _exact_entropy_after(policy: TabularPolicy, v: dict, step: float, weighting: str) -> float:
    """H at theta + step * v on a copied policy (written independently of truth.stepped_parameters)."""
    moved = copy.deepcopy(policy)
    with torch.no_grad():
        for name, p in moved.named_parameters():
            p.add_(step * v[name])
        return float(exact_entropy(moved, weighting))


def test_alpha_zero_is_exactly_zero_with_full_ess():
    policy = _policy()
    update = sample_enumerated(policy, n_units=8, seed=1)
    # Units of different sizes (G = 2 and G = 5) and left-padded prompts of different lengths.
    evalb = _concat(
        sample_enumerated(policy, n_units=5, group_size=2, seed=2),
        sample_enumerated(policy, n_units=4, group_size=5, seed=3),
    )
    probe = ep.EntropyProbe(
        policy, config=ep.ProbeConfig(entropy="sequence", lr=0.3, truth_alphas=(0.0, 0.5, 1.0))
    )
    t = probe.run(update, evalb, truth=True).truth
    assert t.delta_h_at[0] == 0.0  # every weight is exactly 1: same forward at theta and theta + 0 v
    assert t.ess_at[0] == evalb.n_sequences == 30
    assert t.se_at[0] == 0.0 and t.se_diff_at[0] == 0.0
    assert t.delta_h_at[1] != 0.0 and t.ess_at[1] < 30  # the other alphas do move (the test can fail)
    assert t.delta_h == t.delta_h_at[2]  # the headline is alpha = 1


def test_headline_is_alpha_one_wherever_it_is_in_the_sweep():
    policy = _policy()
    update, evalb = sample_enumerated(policy, 8, seed=1), sample_enumerated(policy, 8, seed=2)
    t = (
        ep.EntropyProbe(policy, config=ep.ProbeConfig(entropy="sequence", lr=0.3, truth_alphas=(1.0, 0.25)))
        .run(update, evalb, truth=True)
        .truth
    )
    assert t.delta_h == t.delta_h_at[0] and t.se_diff == t.se_diff_at[0] and t.ess == t.ess_at[0]
    t = (
        ep.EntropyProbe(policy, config=ep.ProbeConfig(entropy="sequence", lr=0.3, truth_alphas=(0.25, 0.5)))
        .run(update, evalb, truth=True)
        .truth
    )
    assert t.delta_h == t.delta_h_at[-1]


@pytest.mark.parametrize("weighting", ["token-mean", "sum"])
def test_truth_equals_exact_entropy_difference(weighting):
    policy = _policy()
    update = sample_enumerated(policy, n_units=32, seed=11)
    evalb = sample_enumerated(policy, n_units=400, seed=12)
    lr, alphas = 0.3, (0.5, 1.0)
    probe = ep.EntropyProbe(
        policy,
        config=ep.ProbeConfig(
            entropy="sequence",
            lr=lr,
            entropy_weighting=weighting,
            truth_alphas=alphas,
            unconditional_se=False,
        ),
    )
    v = probe.update_direction(update)
    t = probe.run(eval_batch=evalb, direction=v, truth=True).truth
    h0 = float(exact_entropy(policy, weighting).detach())
    for alpha, got, se in zip(alphas, t.delta_h_at, t.se_at):
        exact = _exact_entropy_after(policy, v, alpha * lr, weighting) - h0
        # The estimator is unbiased (test below); the step is large enough that the change is many SEs
        # from 0 (so a truth without importance weights or of the wrong sign fails).
        assert abs(exact) > 5 * se
        assert abs(got - exact) <= K_SE * se, (alpha, got, exact, se)


@pytest.mark.parametrize("kind", ["Adam", "AdamW"])
def test_optimizer_step_truth_matches_a_real_step(kind):
    policy = _policy(seed=5)
    lr = 0.2
    opt = (
        torch.optim.Adam(policy.parameters(), lr=lr)
        if kind == "Adam"
        else torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.1)
    )
    # Two real steps first, so that momentum and the second moment are non-trivial.
    for seed in (21, 22):
        opt.zero_grad()
        (-_grpo_objective(policy, sample_enumerated(policy, 16, seed=seed))).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    update, evalb = sample_enumerated(policy, 32, seed=23), sample_enumerated(policy, 400, seed=24)
    copied_model, copied_opt = copy.deepcopy(
        (policy, opt)
    )  # one deepcopy: the copy's opt holds the copy's params
    before_params = {n: p.detach().clone() for n, p in policy.named_parameters()}
    before_state = copy.deepcopy(opt.state_dict())
    policy.train()
    rng = torch.get_rng_state()

    probe = ep.EntropyProbe(
        policy, opt, ep.ProbeConfig(entropy="sequence", direction="optimizer-step", unconditional_se=False)
    )
    result = probe.run(update, evalb, truth=True)
    # The live model, its grads, the optimizer, the RNG and the train flag are untouched.
    for n, p in policy.named_parameters():
        assert torch.equal(p, before_params[n]) and p.grad is None
    assert _same_state(opt.state_dict(), before_state)
    assert torch.equal(torch.get_rng_state(), rng) and policy.training

    # The real step, on the copies, with the GRPO loss written out here.
    copied_opt.zero_grad()
    (-_grpo_objective(copied_model, update)).backward()
    copied_opt.step()
    v = probe.update_direction(update)
    for n, p in copied_model.named_parameters():
        torch.testing.assert_close(before_params[n] + lr * v[n], p.detach(), rtol=0, atol=2e-6)

    # (1) exact enumeration at the stepped copy, within the truth's SE.
    exact = float(exact_entropy(copied_model).detach() - exact_entropy(policy).detach())
    assert abs(exact) > 5 * result.truth.se
    assert abs(result.truth.delta_h - exact) <= K_SE * result.truth.se
    # (2) the change written out unit by unit with the stepped copy's own log-probs: the same number up
    # to fp32 rounding.
    with torch.no_grad():
        lp0 = sequence_logprobs(policy, evalb, 1.0, "token-mean")
        lp1 = sequence_logprobs(copied_model, evalb, 1.0, "token-mean")
    by_hand = hand_entropy_change(evalb, lp0.seq, lp0.weighted, lp1.seq, lp1.weighted)
    assert abs(result.truth.delta_h - by_hand) <= 1e-5 * max(abs(by_hand), 1e-3)


def _grpo_objective(model, batch: ep.RolloutBatch) -> torch.Tensor:
    """GRPO's J: mean over sequences of A_i * (mean token log-prob), A the group z-score
    (std unbiased + 1e-4, as TRL 1.16)."""
    r = batch.rewards.double()
    adv = torch.empty_like(r)
    for g in batch.group_ids.unique():
        rows = batch.group_ids == g
        adv[rows] = (r[rows] - r[rows].mean()) / (r[rows].std() + 1e-4)
    lp = sequence_logprobs(model, batch, 1.0, "token-mean")  # weighted = token-mean log-prob
    return (adv.float() * lp.weighted).mean()


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not _same_state(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_se_diff_and_se_match_a_brute_force_jackknife():
    policy = _policy()
    lr, alphas = 0.3, (0.5, 1.0)
    update, evalb = sample_enumerated(policy, 16, seed=31), sample_enumerated(policy, 10, seed=32)
    probe = ep.EntropyProbe(
        policy, config=ep.ProbeConfig(entropy="sequence", lr=lr, truth_alphas=alphas, unconditional_se=False)
    )
    v = probe.update_direction(update)
    t = probe.run(eval_batch=evalb, direction=v, truth=True).truth
    params = dict(policy.named_parameters())
    b = evalb.n_units
    for i, alpha in enumerate(alphas):
        stepped = {n: (p + alpha * lr * v[n]).detach() for n, p in params.items()}
        truth_loo, diff_loo = [], []
        for drop in range(b):
            sub = evalb.select_units([u for u in range(b) if u != drop])
            with torch.no_grad():
                lp0 = sequence_logprobs(policy, sub, 1.0, "token-mean")
                lp1 = sequence_logprobs(policy, sub, 1.0, "token-mean", params=stepped)
            truth = hand_entropy_change(sub, lp0.seq, lp0.weighted, lp1.seq, lp1.weighted)
            pred = (
                alpha * probe.run(eval_batch=sub, direction=v).delta_h1
            )  # the probe rerun without unit `drop`
            truth_loo.append(truth)
            diff_loo.append(truth - pred)
        assert math.isclose(t.se_at[i], _jackknife(truth_loo), rel_tol=1e-6)
        assert math.isclose(t.se_diff_at[i], _jackknife(diff_loo), rel_tol=1e-6)
        assert t.se_diff_at[i] < t.se_at[i]  # truth and prediction share E: their difference is less noisy


def _jackknife(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt((n - 1) / n * sum((x - mean) ** 2 for x in values))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_alphas_are_rejected_by_name(bad):
    with pytest.raises(ValueError, match=r"ProbeConfig\.truth_alphas.*" + repr(bad).replace("-", r"\-")):
        ep.ProbeConfig(truth_alphas=(0.5, bad))
    # The config is frozen: a bad value cannot be set after construction either, and replace() validates.
    config = ep.ProbeConfig(entropy="sequence", lr=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.truth_alphas = (1.0, bad)
    with pytest.raises(ValueError, match=r"ProbeConfig\.truth_alphas"):
        dataclasses.replace(config, truth_alphas=(1.0, bad))


def test_empty_alphas_are_rejected():
    with pytest.raises(ValueError, match=r"ProbeConfig\.truth_alphas"):
        ep.ProbeConfig(truth_alphas=())


def test_unrepresentable_importance_weight_is_an_error_naming_the_sequence():
    # A very peaked policy and every response of every prompt: some have log-prob below -700. A step to the
    # uniform policy raises those by more than 700 nats; exp() would overflow and SNIS give inf / inf.
    policy = TabularPolicy(seed=0, scale=400.0)
    evalb = sample_enumerated(TabularPolicy(seed=0, scale=0.0), n_units=8, seed=1)  # uniform draws
    v = {"table": -policy.table.detach().clone()}  # theta + 1.0 * v = 0: the uniform policy
    probe = ep.EntropyProbe(policy, config=ep.ProbeConfig(entropy="sequence", lr=1.0, unconditional_se=False))
    with pytest.raises(ValueError, match=r"importance weight of eval sequence \d+ is exp\("):
        probe.run(eval_batch=evalb, direction=v, truth=True)


# ---- degenerate importance weights and the least-squares slope (issue 11) ---------------------------
def test_degenerate_weights_are_flagged_and_never_give_nan():
    """One unit carries all the weight (the others' log-ratios are -800: exp underflows to 0): the ESS is
    that unit's G, reliable is False, and the change and its SEs are finite numbers, never NaN."""
    from entropy_probe.logprobs import SequenceLogProbs
    from entropy_probe.truth import entropy_change, ess_threshold

    batch = sample_enumerated(_policy(), 6, seed=3)  # 6 units of G = 4
    before = SequenceLogProbs(torch.zeros(24), -torch.rand(24, generator=torch.Generator().manual_seed(0)))
    shift = torch.full((24,), -800.0)
    shift[batch.unit_index == 2] = 0.0
    after = SequenceLogProbs(before.seq + shift, before.weighted * 1.1)
    change = entropy_change(batch, before, after, torch.zeros(6), lr=1.0)
    assert all(not math.isnan(x) for x in change)
    assert change.ess == pytest.approx(4.0) and change.ess < ess_threshold(24) and not change.reliable
    assert math.isfinite(change.se) and math.isfinite(change.se_diff)
    assert ess_threshold(24) == 8.0 and ess_threshold(1000) == 100.0 and ess_threshold(4) == 2.0


def test_huge_step_warns_and_marks_the_truth_unreliable():
    policy = TabularPolicy(seed=0)  # scale 1
    update, evalb = sample_enumerated(policy, 8, seed=1), sample_enumerated(policy, 16, seed=2)
    probe = ep.EntropyProbe(policy, config=ep.ProbeConfig(entropy="sequence", lr=1e4, direction="sgd"))
    with pytest.warns(RuntimeWarning, match="degenerate importance weights"):
        r = probe.run(update, evalb, truth=True)
    assert not r.truth.reliable and r.truth.ess < 8  # ESS 2.2 of 64 sequences
    assert r.to_dict()["entropy_probe/truth/reliable"] is False
    assert all(math.isfinite(v) for v in (r.truth.delta_h, r.truth.se, r.truth.ess, r.truth.se_diff))
    small_probe = ep.EntropyProbe(policy, config=ep.ProbeConfig(entropy="sequence", lr=1e-2, direction="sgd"))
    small = small_probe.run(update, evalb, truth=True)
    assert small.truth.reliable and small.truth.ess > 60


def test_truth_slope_is_the_least_squares_slope_through_the_origin():
    """On a curved sweep sum(a d) / sum(a^2) and sum(d) / sum(a) differ by far more than rounding."""
    import numpy as np

    policy = _policy(seed=0)
    cfg = ep.ProbeConfig(entropy="sequence", lr=60.0, direction="sgd", truth_alphas=(0.25, 1.0, 2.0))
    r = ep.EntropyProbe(policy, config=cfg).run(
        sample_enumerated(policy, 8, seed=1), sample_enumerated(policy, 64, seed=2), truth=True
    )
    a, d = np.array(r.truth.alphas), np.array(r.truth.delta_h_at)
    lstsq = float(np.linalg.lstsq(a[:, None], d, rcond=None)[0][0])
    ratio_of_sums = float(d.sum() / a.sum())
    assert abs(lstsq - ratio_of_sums) > 1e-3 * abs(lstsq)  # the sweep is curved: the two formulas differ
    assert r.truth.slope == pytest.approx(lstsq, rel=1e-9)


def test_truth_minus_forecast_is_the_taylor_remainder_on_the_same_e():
    """On one E the truth, as a function of alpha, has the forecast's s_n and q_n as its derivatives at 0
    (the control-variate estimator of DESIGN sections 3, 6 and 12): truth - alpha delta_h1 shrinks like
    alpha^2 and truth - alpha delta_h1 - alpha^2 delta_h2 like alpha^3. Deterministic given E. A truth
    with another baseline (the self-normalised ratio's global mean) differs at first order: its
    remainder shrinks like alpha, ratio 2 per halving, and this test fails."""
    policy = _policy()
    alphas = (1 / 16, 1 / 8, 1 / 4)
    cfg = ep.ProbeConfig(entropy="sequence", lr=10.0, direction="sgd", second_order=True, truth_alphas=alphas)
    r = ep.EntropyProbe(policy, config=cfg).run(
        sample_enumerated(policy, 16, seed=5), sample_enumerated(policy, 32, seed=6), truth=True
    )
    first = [t - a * r.delta_h1 for t, a in zip(r.truth.delta_h_at, alphas)]
    second = [t - a * r.delta_h1 - a * a * r.delta_h2 for t, a in zip(r.truth.delta_h_at, alphas)]
    # log2 of the ratio per doubling of alpha is the order of the remainder, plus the next term's share
    # (measured: first order 1.99, 1.98; second 3.44, 3.33). The fp32 floor of a change (~3e-8, seen at
    # tiny steps) is about a tenth of second[0] = 2.6e-7.
    for lo, hi in zip(first, first[1:]):
        assert 1.8 <= math.log2(hi / lo) <= 2.2, first
    for lo, hi in zip(second, second[1:]):
        assert 2.8 <= math.log2(hi / lo) <= 3.8, second


@pytest.mark.parametrize("weighting", ["token-mean", "sum"])
def test_truth_is_unbiased_and_its_se_calibrated_over_independent_draws_of_e(weighting):
    """The definition: over K independent small E (8 units of G = 4) at one fixed step, the truths
    average to the exact change and their spread is what their SEs say."""
    from entropy_probe.validation.stats import chi2_ratio_interval

    policy = _policy()
    lr, draws = 1.0, 400
    probe = ep.EntropyProbe(
        policy,
        config=ep.ProbeConfig(entropy="sequence", lr=lr, entropy_weighting=weighting, unconditional_se=False),
    )
    v = probe.update_direction(sample_enumerated(policy, n_units=32, seed=11))
    exact = _exact_entropy_after(policy, v, lr, weighting) - float(exact_entropy(policy, weighting).detach())
    err, var = [], []
    for k in range(draws):
        t = probe.run(eval_batch=sample_enumerated(policy, 8, seed=5000 + k), direction=v, truth=True).truth
        err.append(t.delta_h - exact)
        var.append(t.se**2)
    err_t = torch.tensor(err, dtype=torch.float64)
    sd = float(err_t.std())
    # unbiased: the mean error within K_SE standard errors of a mean of `draws` independent errors
    assert abs(float(err_t.mean())) <= K_SE * sd / math.sqrt(draws), (float(err_t.mean()), sd, exact)
    assert abs(exact) > 10 * sd / math.sqrt(draws)  # the change itself is far from 0 at that precision
    # calibrated: observed variance / mean SE^2 inside the chi-square band of `draws - 1` dof at K_SE.
    # (measured: ratio 0.97 token-mean, 0.98 sum; mean error -0.36 and -0.34 of its SE).
    lo, hi = chi2_ratio_interval(draws - 1, K_SE)
    ratio = sd**2 / (sum(var) / draws)
    assert lo <= ratio <= hi, (ratio, lo, hi)
