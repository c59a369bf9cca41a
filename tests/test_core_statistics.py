"""Statistics of the s_n (DESIGN section 5) against numpy, closed forms and a brute force.

- delta_h1, Var_E, SE_E equal numpy's mean / ddof=1 variance on the probe's own s_n;
- the jackknife equals the closed form ``eta sqrt(var(s)/B)`` (exact for a mean);
- Chan-merged float64 moments survive a 1e6 common offset where the note's float32 S2 - B mean^2 fails;
- B_E < 2: SE 0 and a warning;
- se_total: the delete-one-U-unit jackknife against per-unit g_m, X_n and v_(-m) materialised by hand;
- all advantages zero: delta_h1 exactly 0 and SE 0.

Run: ``PYTHONPATH=src pytest -q tests/test_core_statistics.py``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from core_support import (
    TinyLM,
    brute_force_grad_j_units,
    brute_force_x,
    flat,
    numpy_advantages,
    random_batch,
    trainable,
)

import entropy_probe as ep
from entropy_probe import RolloutBatch
from entropy_probe.statistics import conditional_variance, jackknife_se, moments_merge, moments_update

ETA = 1e-2


def _warm_adamw(model, steps=2, lrs=(1e-2, 3e-3)):
    """AdamW with two groups (different lr and decay) and real state from ``steps`` real steps."""
    opt = torch.optim.AdamW(
        [
            dict(params=[model.tok, model.pos, *model.hidden.parameters()], lr=lrs[0], weight_decay=0.1),
            dict(params=list(model.head.parameters()), lr=lrs[1], weight_decay=0.0),
        ],
        betas=(0.8, 0.95),
        eps=1e-6,
    )
    for k in range(steps):
        opt.zero_grad()
        out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), attention_mask=torch.ones(1, 4, dtype=torch.long))
        (out.square().mean() * (k + 1)).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def test_statistics_equal_numpy_on_the_same_s():
    model = TinyLM(seed=0)
    update, evaluation = random_batch(4, seed=1), random_batch(9, group_size=[2, 3, 4] * 3, seed=2)
    r = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=ETA, direction="sgd")).run(update, evaluation)
    s = r.per_unit.numpy()
    assert s.dtype == np.float64 and s.shape == (9,) and r.n_eval_units == 9
    b = len(s)
    assert r.delta_h1 == pytest.approx(ETA * s.mean(), rel=1e-12)
    assert r.var_cond_e == pytest.approx(ETA**2 * s.var(ddof=1) / b, rel=1e-12)
    assert r.se_cond_e == pytest.approx(ETA * math.sqrt(s.var(ddof=1) / b), rel=1e-12)
    assert r.se_jackknife == pytest.approx(r.se_cond_e, rel=1e-10)
    z = NormalDist().inv_cdf(0.975)  # 1.95996...: the 95% interval
    normal = (r.delta_h1 - z * r.se_cond_e, r.delta_h1 + z * r.se_cond_e)
    assert r.interval(z=z) == pytest.approx(normal, rel=1e-12)
    assert torch.equal(r.eval_unit_ids, evaluation.unit_ids)


@pytest.mark.parametrize("b", [2, 3, 17, 200])
def test_jackknife_equals_closed_form_and_explicit_deletion(b):
    s = torch.from_numpy(np.random.default_rng(b).standard_t(3, size=b))
    x = s.numpy()
    loo = np.array([ETA * np.delete(x, n).mean() for n in range(b)])  # Z_(-n), by deleting
    explicit = math.sqrt((b - 1) / b * ((loo - loo.mean()) ** 2).sum())
    closed = ETA * math.sqrt(x.var(ddof=1) / b)
    assert jackknife_se(s, ETA) == pytest.approx(explicit, rel=1e-10)
    assert jackknife_se(s, ETA) == pytest.approx(closed, rel=1e-10)


def test_chan_merge_keeps_precision_under_a_large_offset():
    """s_n = 1e6 + N(0, 1): float64 Chan-merged chunks keep the variance; the note's float32 one does not."""
    gen = np.random.default_rng(0)
    s32 = (1e6 + gen.normal(size=4000)).astype(np.float32)  # the probe's s_n are fp32 device scalars
    exact_var = s32.astype(np.float64).var(ddof=1)  # numpy, two-pass in float64
    cuts = [0, 1, 37, 1000, 1001, 2500, 4000]  # uneven chunks, one of a single value (as ranks would send)
    m = moments_update(torch.from_numpy(s32[:0]))
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        m = moments_merge(m, moments_update(torch.from_numpy(s32[lo:hi])))
    var, se = conditional_variance(m, lr=1.0)
    assert int(m.count) == 4000
    assert float(m.mean) == pytest.approx(s32.astype(np.float64).mean(), rel=1e-15)
    assert var * 4000 == pytest.approx(exact_var, rel=1e-9)
    # The note: S1, S2 all-reduced as float32 scalars, then (S2 - B sbar^2) / (B - 1).
    t = torch.from_numpy(s32)
    s1, s2, n = t.sum(dtype=torch.float32), (t * t).sum(dtype=torch.float32), torch.tensor(4000.0)
    note_var = float((s2 - n * (s1 / n) ** 2) / (n - 1))
    print(f"variance: exact {exact_var:.6f}, Chan float64 {var * 4000:.6f}, note float32 {note_var:.6g}")
    assert abs(note_var - exact_var) > 10 * exact_var  # catastrophic cancellation: not even the magnitude


def test_fewer_than_two_eval_units_gives_se_zero_with_a_warning():
    """The sequence functional's mean of s_n needs one unit; the token default's ratio (jackknifed by
    deleting a unit) needs two, and says so."""
    model = TinyLM(seed=0)
    update, evaluation = random_batch(3, seed=1), random_batch(1, seed=2)
    probe = ep.EntropyProbe(model, config=ep.ProbeConfig(entropy="sequence", lr=ETA, direction="sgd"))
    with pytest.warns(RuntimeWarning, match="fewer than 2 units"):
        r = probe.run(update, evaluation)
    assert r.n_eval_units == 1 and r.delta_h1 != 0 and math.isfinite(r.delta_h1)
    assert r.se_cond_e == 0.0 and r.var_cond_e == 0.0 and r.se_jackknife == 0.0
    token = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=ETA, direction="sgd"))
    with pytest.raises(ValueError, match="eval_batch: .* needs at least 2 evaluation units, got 1"):
        token.run(update, evaluation)


def test_two_eval_units_are_enough_for_a_variance_and_warn_nothing():
    """B_E = 2, the smallest sample with a variance: ``(s_1 - s_2)^2 / 2`` by definition, no warning (a
    mutant ``n < 2`` -> ``n < 3`` in ``sample_variance`` survived every other test, issue 23)."""
    import warnings

    from entropy_probe.statistics import conditional_variance, moments_update

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        var, se = conditional_variance(moments_update(torch.tensor([1.0, 4.0])), lr=0.5)
    expected = 0.5**2 * ((1.0 - 4.0) ** 2 / 2) / 2  # eta^2 var(s) / B_E
    assert var == pytest.approx(expected, rel=1e-12) and se == pytest.approx(math.sqrt(expected), rel=1e-12)


# ---- se_total against a brute force ------------------------------------------------------------------
def hand_y_scale(model, optimizer, kind, grad_j, eta, clip):
    """Per-parameter ``(scale, b)``, ``v = b + scale * grad J_U`` and ``Y_m = scale * grad J_m``, by hand."""
    params = trainable(model)
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grad_j.values()))
    c = 1.0 if clip is None else min(1.0, clip / (norm + 1e-6))  # clip_grad_norm_'s coefficient
    scale, offset = {}, {}
    for group in optimizer.param_groups:
        b1, b2 = group["betas"]
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            g, st, ratio = grad_j[name].double(), optimizer.state[p], group["lr"] / eta
            step = int(st["step"])
            if kind == "sgd":
                scale[name], offset[name] = torch.full_like(g, ratio), torch.zeros_like(g)
            elif kind == "adam-preconditioned":
                # the v_hat of Adam's next step: this gradient folded in, bias-corrected at t = step + 1
                v_hat = (b2 * st["exp_avg_sq"].double() + (1 - b2) * g * g) / (1 - b2 ** (step + 1))
                scale[name], offset[name] = ratio / (v_hat.sqrt() + group["eps"]), torch.zeros_like(g)
            else:  # optimizer-step (AdamW): descent gradient d = -c g, t = step + 1
                t = step + 1
                d = -c * g
                second = b2 * st["exp_avg_sq"].double() + (1 - b2) * d * d
                denom = second.sqrt() / math.sqrt(1 - b2**t) + group["eps"]
                bc1 = 1 - b1**t
                scale[name] = ratio * (1 - b1) * c / (bc1 * denom)
                offset[name] = (
                    -ratio * b1 * st["exp_avg"].double() / (bc1 * denom)
                    - ratio * group["weight_decay"] * p.detach().double()
                )
    return scale, offset


@pytest.mark.parametrize(
    "kind,clip",
    [("sgd", None), ("adam-preconditioned", None), ("optimizer-step", None), ("optimizer-step", 1e-3)],
)
def test_se_total_against_materialised_y(kind, clip):
    model = TinyLM(seed=5)
    optimizer = _warm_adamw(model)
    update = random_batch(5, group_size=[2, 3, 4, 3, 2], seed=6)
    evaluation = random_batch(6, group_size=[3, 2, 4, 3, 3, 2], seed=7)
    probe = ep.EntropyProbe(
        model,
        optimizer,
        ep.ProbeConfig(entropy="sequence", direction=kind, max_grad_norm=clip, microbatch_units=2),
    )
    r = probe.run(update, evaluation)
    eta = probe.lr
    params = trainable(model)
    v = flat(probe.update_direction(update), params)

    x = brute_force_x(model, evaluation)  # (B_E, P) X_n, per-sequence backward passes
    np.testing.assert_allclose(r.per_unit.numpy(), x @ v, rtol=1e-4, atol=1e-6 * np.abs(x @ v).max())
    gj_units = brute_force_grad_j_units(
        model, update, numpy_advantages(update, "grpo"), "seq-mean-token-mean"
    )
    gj = gj_units.mean(0)  # grad J_U = mean_m grad J_m
    sizes = [p.numel() for p in params.values()]
    grad_j = {
        n: torch.from_numpy(chunk).reshape(p.shape)  # (P,) -> parameter shapes
        for (n, p), chunk in zip(params.items(), np.split(gj, np.cumsum(sizes)[:-1]))
    }
    scale, offset = hand_y_scale(model, optimizer, kind, grad_j, eta, clip)
    y = gj_units * flat(scale, params)  # (B_U, P) Y_m
    # the exact split v = b + mean_m Y_m
    np.testing.assert_allclose(v, flat(offset, params) + y.mean(0), rtol=1e-4, atol=1e-5 * np.abs(v).max())
    # the jackknife over U of docs/design.md section 7, rebuilt by hand: v without a unit (or a group) by
    # the hand formulas (Adam's v_hat and the clip factor recomputed), projected on the two halves of E
    n = len(gj_units)

    def dv_without(units: list[int]) -> np.ndarray:  # (P,) v(g without those units) - v, by hand
        g_minus = (n * gj - gj_units[units].sum(0)) / (n - len(units))  # (P,)
        gm = {
            k: torch.from_numpy(c).reshape(p.shape)
            for (k, p), c in zip(params.items(), np.split(g_minus, np.cumsum(sizes)[:-1]))
        }
        sc, off = hand_y_scale(model, optimizer, kind, gm, eta, clip)
        return flat(off, params) + flat(sc, params) * g_minus - v

    x_a, x_b = x[0::2].mean(0), x[1::2].mean(0)  # halves: even and odd E positions
    dv = np.stack([dv_without([m]) for m in range(n)])  # (B_U, P)
    if kind == "sgd":  # a linear map: the delete-one jackknife
        a, b = dv @ x_a, dv @ x_b
        var_u = eta**2 * (n - 1) / n * float(((a - a.mean()) * (b - b.mean())).sum())
    else:  # the delete-a-group jackknife (update_groups): B_U = 5 in 4 blocks, position p in 4p // 5
        groups = [[0, 1], [2], [3], [4]]
        dg = np.stack([dv_without(g) for g in groups])  # (G, P)
        a, b = dg @ x_a, dg @ x_b
        d = np.array([len(g) for g in groups], dtype=float)
        w = (n - d) ** 2 / (d * n * 3)  # (B_U - d_k)^2 / (d_k B_U (G - 1))
        abar, bbar = ((n - d) * a).sum() / (n - d).sum(), ((n - d) * b).sum() / (n - d).sum()
        var_u = eta**2 * float((w * (a - abar) * (b - bbar)).sum())
    expected = math.sqrt(r.var_cond_e + max(var_u, 0.0))
    print(f"{kind} clip={clip}: se_cond_e={r.se_cond_e:.3e} se_total={r.se_total:.3e} V_U={var_u:.3e}")
    assert abs(var_u) > 1e-3 * r.var_cond_e  # the U term is not negligible, so the comparison has teeth
    assert r.var_update == pytest.approx(var_u, rel=1e-3)
    assert r.se_total == pytest.approx(expected, rel=1e-4)
    xbar_dv = dv @ x.mean(0)  # the influences: for sgd eta Xbar.Y_m / B_U, else the delete-one change
    influence = (eta * y @ x.mean(0) / n) if kind == "sgd" else -eta * xbar_dv
    np.testing.assert_allclose(
        r.update_influence.numpy(), influence, rtol=1e-3, atol=1e-4 * np.abs(influence).max()
    )
    assert r.update_unit_ids.tolist() == update.unit_ids.tolist()


# ---- advantages all zero -------------------------------------------------------------------------------
def _zero_advantage_batch(kind: str, n_units=4, seed=0) -> RolloutBatch:
    b = random_batch(n_units, seed=seed)
    if kind == "given":
        return RolloutBatch(
            b.input_ids, b.attention_mask, b.response_mask, b.group_ids, advantages=torch.zeros(b.n_sequences)
        )
    tied = b.unit_index.float() * 0.37  # every response of a unit gets the same reward: grpo gives exactly 0
    return RolloutBatch(b.input_ids, b.attention_mask, b.response_mask, b.group_ids, rewards=tied)


@pytest.mark.parametrize("direction", ["adam-preconditioned", "sgd"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("zeros", ["given", "tied-rewards"])
def test_zero_advantages_give_exactly_zero(direction, with_state, zeros):
    model = TinyLM(seed=3)
    optimizer = _warm_adamw(model) if with_state else None
    probe = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(lr=ETA, direction=direction))
    update, evaluation = _zero_advantage_batch(zeros), random_batch(5, seed=9)
    assert all(float(t.abs().max()) == 0.0 for t in probe.update_direction(update).values())
    r = probe.run(update, evaluation)
    assert r.delta_h1 == 0.0 and r.se_cond_e == 0.0 and r.var_cond_e == 0.0 and r.se_jackknife == 0.0
    assert r.se_total == 0.0
    assert torch.equal(r.per_unit, torch.zeros(5, dtype=torch.float64))


def test_se_total_absent_without_u_and_result_dict_is_json_ready():
    import json

    model = TinyLM(seed=0)
    update, evaluation = random_batch(3, seed=1), random_batch(4, seed=2)
    probe = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=ETA, direction="sgd"))
    given = probe.run(eval_batch=evaluation, direction=probe.update_direction(update))
    full = probe.run(update, evaluation)
    no_total = ep.EntropyProbe(
        model, config=ep.ProbeConfig(lr=ETA, direction="sgd", unconditional_se=False)
    ).run(update, evaluation)
    assert given.se_total is None and given.n_update_units == 0 and no_total.se_total is None
    assert full.n_update_units == 3 and full.se_total >= full.se_cond_e  # V_U enters clamped at 0
    # the same v from U or given: the same s_n, bit for bit
    assert torch.equal(given.per_unit, full.per_unit) and given.delta_h1 == full.delta_h1
    d = json.loads(json.dumps(full.to_dict()))
    assert d["entropy_probe/delta_h1"] == full.delta_h1 and d["entropy_probe/n_eval_units"] == 4
    assert d["entropy_probe/se_total"] == full.se_total and all(k.startswith("entropy_probe/") for k in d)


def test_results_do_not_depend_on_microbatch_units():
    """Microbatching only regroups the same sums: 1, 3 or 50 units per forward give the same numbers."""
    model = TinyLM(seed=8)
    optimizer = _warm_adamw(model)
    update, evaluation = random_batch(7, seed=10), random_batch(5, seed=11)
    results = [
        ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction="optimizer-step", microbatch_units=k)).run(
            update, evaluation
        )
        for k in (1, 3, 50)
    ]
    for r in results[1:]:  # fp32 sums in a different order: agreement to float32 rounding
        assert r.delta_h1 == pytest.approx(results[0].delta_h1, rel=1e-5)
        assert r.se_total == pytest.approx(results[0].se_total, rel=1e-5)
        torch.testing.assert_close(r.per_unit, results[0].per_unit, rtol=1e-5, atol=1e-9)


def test_degenerate_samples_give_a_point_interval_and_zero_jackknife_se():
    """Equal s_n have no spread: the bootstrap-t interval is the point ``eta * s`` and a single unit has a
    jackknife SE of 0 (issue 23: mutants of these branches survived)."""
    from entropy_probe.statistics import bootstrap_t_interval, jackknife_se

    assert bootstrap_t_interval(torch.full((5,), 2.0), lr=0.5, level=0.95) == (1.0, 1.0)
    assert jackknife_se(torch.tensor([3.0]), lr=0.5) == 0.0


# ---- the edges of the statistics, one property each (mutants of them survived, docs/mutation.md) ------
def test_too_few_units_warn_at_the_caller_with_a_readable_message():
    """The warning reads whole (it starts with the cause, ends with the consequence) and points at the line
    that asked for the variance (``conditional_variance``'s caller, here this test), not into the package.
    No units at all: variance and SE 0, not a ZeroDivisionError."""
    for values, n in ((torch.tensor([3.0]), 1), (torch.empty(0), 0)):
        with pytest.warns(RuntimeWarning) as record:
            var, se = conditional_variance(moments_update(values), lr=0.5)  # the line warned about
        assert (var, se) == (0.0, 0.0)
        (w,) = record
        message = str(w.message)
        assert message.startswith(f"fewer than 2 units ({n}) for the variance of s over evaluation units")
        assert message.endswith("its SE is reported as 0")
        assert w.filename == __file__


def test_student_t_expansion_is_exact_to_order_one_over_df_to_the_4th():
    """Cornish-Fisher to 1/df^4 (Abramowitz-Stegun 26.7.5): the error against scipy's exact quantile falls
    as df^-5, a factor 32 per doubling of df (measured 32.2-33.7 for df 8-128: the next term's own 1/df
    correction). A wrong coefficient in any term k leaves an error falling as df^-k only, so the ratio drops
    to 2^k <= 16 once that error dominates; the 1e-3 agreement of test_interval cannot see it."""
    from scipy import stats

    from entropy_probe.statistics import student_t_quantile

    for p in (0.9, 0.975, 0.995):
        errors = [student_t_quantile(p, df) - float(stats.t.ppf(p, df)) for df in (8, 16, 32, 64, 128)]
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        assert all(31.5 < r < 34.5 for r in ratios), (p, ratios)


def test_interval_of_the_smallest_and_the_empty_sample():
    """Two distinct units are the smallest sample with a spread: a proper interval around the mean (the
    Student-t half of the hull; the bootstrap-t alone is the point there: a resample either repeats one
    unit, se* = 0, dropped, or holds both, t* = 0). No units: the point 0 (the mean of nothing taken as 0),
    never NaN."""
    from entropy_probe.statistics import bootstrap_t_interval, skew_aware_interval

    lo, hi = skew_aware_interval(torch.tensor([1.0, 3.0], dtype=torch.float64), lr=0.5, level=0.9)
    assert lo < 0.5 * 2.0 < hi and math.isfinite(lo) and math.isfinite(hi)
    for interval in (bootstrap_t_interval, skew_aware_interval):
        assert interval(torch.empty(0), lr=0.5, level=0.9) == (0.0, 0.0)


def test_bootstrap_t_interval_is_the_textbook_bootstrap_t_drawn_in_one_block():
    """The chunks of 256 resamples only bound memory: the interval equals the bootstrap-t written out in one
    block from the same private generator (torch draws the same index stream either way): resample the
    units with replacement, t* = (mean* - mean) / se* over the resamples with se* > 0, and
    eta * (mean - q_hi se, mean - q_lo se) with q the (1 -+ level) / 2 quantiles of t*."""
    from entropy_probe.statistics import BOOTSTRAP_SEED, bootstrap_t_interval

    gen = torch.Generator().manual_seed(5)
    s = -(torch.empty(9, dtype=torch.float64).exponential_(generator=gen) ** 2)  # skewed: q_lo != -q_hi
    b, resamples, level, eta = 9, 1000, 0.9, 0.5
    idx = torch.randint(b, (resamples, b), generator=torch.Generator().manual_seed(BOOTSTRAP_SEED))  # (K, B)
    xs = s[idx]  # (K, B)
    se_star = xs.std(dim=1) / math.sqrt(b)
    t = ((xs.mean(dim=1) - s.mean()) / se_star)[se_star > 0]
    q_lo, q_hi = np.quantile(t.numpy(), [(1 - level) / 2, (1 + level) / 2])
    mean, se = float(s.mean()), float(s.std()) / math.sqrt(b)
    expected = (eta * (mean - q_hi * se), eta * (mean - q_lo * se))
    assert bootstrap_t_interval(s, eta, level, resamples=resamples) == pytest.approx(expected, rel=1e-12)


def test_jackknife_of_fewer_than_two_delete_one_estimates_is_zero():
    """The truth hands its per-unit changes to ``jackknife_se_of``: one estimate (or none) has no spread to
    measure, SE 0, never NaN; two give ``sqrt(1/2 * sum (Z - mean Z)^2) = |Z_1 - Z_2| / 2``."""
    from entropy_probe.statistics import jackknife_se_of

    assert jackknife_se_of(torch.tensor([2.5])) == 0.0 and jackknife_se_of(torch.empty(0)) == 0.0
    assert jackknife_se_of(torch.tensor([1.0, 4.0])) == pytest.approx(1.5, rel=1e-12)


def test_skew_aware_interval_is_the_hull_with_the_exact_student_t_interval():
    """The hull of the bootstrap-t interval and the Student-t interval ``eta (mean -+ t_{(1+level)/2, B-1}
    s / sqrt(B))``, the t quantile from scipy (exact; the expansion is within 1e-3 at df = 4). One sample
    where the t interval is the upper bound of the hull, one where it is the lower: each side is checked
    where it binds."""
    from scipy import stats

    from entropy_probe.statistics import bootstrap_t_interval, skew_aware_interval

    bound = set()
    for values in ([0.3, -1.2, 2.0, 0.7, 1.1], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 30.0]):
        s, b, eta, level = torch.tensor(values, dtype=torch.float64), len(values), 0.5, 0.95
        half = float(stats.t.ppf((1 + level) / 2, b - 1)) * eta * float(s.std()) / math.sqrt(b)
        center = eta * float(s.mean())
        boot_lo, boot_hi = bootstrap_t_interval(s, eta, level)
        lo, hi = skew_aware_interval(s, eta, level)
        assert lo == pytest.approx(min(boot_lo, center - half), rel=1e-3)
        assert hi == pytest.approx(max(boot_hi, center + half), rel=1e-3)
        bound |= {"lo"} if center - half < boot_lo else set()
        bound |= {"hi"} if center + half > boot_hi else set()
    assert bound == {"lo", "hi"}  # the t interval decides each side once: the test has teeth
