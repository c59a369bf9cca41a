"""The checks of ``entropy-probe validate``: each turns repeated probe runs into a ``Check``."""

from __future__ import annotations

import math

import torch

from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..logprobs import WEIGHTINGS
from ..probe import EntropyProbe
from ..statistics import Z95
from ..toy import sample_enumerated
from .problem import CONTROL, TOKEN, Check, Problem, Settings, _probe, _seed, exact_entropy_at
from .stats import chi2_ratio_interval, fit_slope, studentized_coverage, wilson_interval


def _var(x: list[float]) -> float:
    m = sum(x) / len(x)
    return sum((xi - m) ** 2 for xi in x) / (len(x) - 1)


def variance_check(
    name: str, delta_h1: list[float], var_pred: list[float], unit_kurtosis: float, shard_units: int, k: float
) -> Check:
    """Empirical Var(delta_h1) across shards over the mean predicted Var_E, with a chi-square interval.

    With K normal shards, (K-1) * empirical / true ~ chi2(K-1). The s_n of one unit have excess
    kurtosis kappa, so a shard mean of B_E units has kappa / B_E, and the variance of a sample variance
    is sigma^4 (2/(K-1) + kappa/(B_E K)): a chi-square with df = 2 / (2/(K-1) + kappa/(B_E K)) has it.
    The denominator (mean of K predicted variances, unbiased) has relative SE sd(var_pred)/(sqrt(K) mean);
    on the log scale the two errors add in quadrature. They come from the same shards and are positively
    correlated, which narrows the true spread of the ratio: the interval errs on the wide side.
    """
    n = len(delta_h1)
    empirical, predicted = _var(delta_h1), sum(var_pred) / n
    ratio = empirical / predicted
    df = 2.0 / (2.0 / (n - 1) + max(unit_kurtosis, 0.0) / (shard_units * n))
    lo, hi = chi2_ratio_interval(df, k)
    rel_pred = math.sqrt(_var(var_pred) / n) / predicted
    lo = math.exp(-math.hypot(math.log(lo), k * rel_pred))
    hi = math.exp(math.hypot(math.log(hi), k * rel_pred))
    return Check(
        name,
        lo <= ratio <= hi,
        f"ratio {ratio:.3f}",
        f"[{lo:.3f}, {hi:.3f}]",
        dict(
            ratio=ratio,
            interval=[lo, hi],
            empirical_var=empirical,
            mean_predicted_var=predicted,
            chi2_df=df,
            unit_excess_kurtosis=unit_kurtosis,
            rel_se_predicted=rel_pred,
            shards=n,
        ),
    )


def coverage_check(
    name: str,
    delta_h1: list[float],
    se: list[float],
    exact: float,
    shard_units: int,
    unit_skew: float = 0.0,
    unit_kurtosis: float = 0.0,
    k: float = 3.0,
) -> Check:
    """Share of shards whose 95% interval covers the exact value, against the coverage it should have.

    Each shard covers independently with probability p, so the count is Binomial(K, p); the Wilson
    score interval at level k holds p exactly when the score test of p accepts. The p to test is not
    quite 0.95: the SE is estimated from the same B_E skewed s_n, which lowers the coverage of a 1.96-SE
    interval by O(1/B_E) (0.941 for normal s_n at B_E = 32, about 0.93 for the skewed s_n of the "sum"
    weighting). ``studentized_coverage`` gives it from the measured skewness and kurtosis of the s_n;
    its own error, O(1/B_E^2) (< 0.007 at B_E = 32 even for exponential s_n), is far inside the interval.
    ``unit_skew``, ``unit_kurtosis``: of the s_n (0: normal s_n); ``k``: the Wilson interval's z.
    """
    covered = sum(abs(d - exact) <= Z95 * s for d, s in zip(delta_h1, se))
    n = len(delta_h1)
    expected = studentized_coverage(Z95, shard_units, unit_skew, unit_kurtosis)
    lo, hi = wilson_interval(covered, n, k)
    return Check(
        name,
        lo <= expected <= hi,
        f"{covered}/{n} = {covered / n:.3f}",
        f"{expected:.3f} in [{lo:.3f}, {hi:.3f}]",
        dict(
            coverage=covered / n,
            covered=covered,
            shards=n,
            nominal=0.95,
            expected=expected,
            wilson=[lo, hi],
            unit_skewness=unit_skew,
            unit_excess_kurtosis=unit_kurtosis,
        ),
    )


def unbiased_check(name: str, delta_h1: list[float], exact: float, k: float) -> Check:
    """z of the mean over K shards against the exact value; the shards are iid, so SE = sd / sqrt(K)."""
    n = len(delta_h1)
    mean = sum(delta_h1) / n
    se = math.sqrt(_var(delta_h1) / n)
    z = (mean - exact) / se
    return Check(
        name,
        abs(z) <= k,
        f"z = {z:+.2f} ({mean:.3e} vs {exact:.3e})",
        f"|z| <= {k:.2f}",
        dict(
            mean=mean,
            exact=exact,
            se_of_mean=se,
            z=z,
            relative_error=(mean - exact) / exact if exact != 0 else None,
        ),
    )


def slope_check(name: str, factors: list[int], var_by_factor: list[list[float]], k: float) -> Check:
    """Slope of log SE against log c; it must be -1/2 within k SE of the fitted slope.

    Per factor, SE_c = sqrt(mean of the R predicted variances) (the mean of unbiased variances is
    unbiased, unlike a mean of SEs). Delta method: SE(log SE_c) = sd(var) / (2 sqrt(R) mean(var)).
    The shards of different c are independent, so the OLS slope's SE follows from the point SEs.
    """
    x, y, se_y = [], [], []
    for c, vars_c in zip(factors, var_by_factor):
        mean = sum(vars_c) / len(vars_c)
        x.append(math.log(c))
        y.append(0.5 * math.log(mean))
        se_y.append(math.sqrt(_var(vars_c) / len(vars_c)) / (2.0 * mean))
    fit = fit_slope(x, y, se_y)
    z = (fit.slope + 0.5) / fit.se_slope
    return Check(
        name,
        abs(z) <= k,
        f"slope {fit.slope:+.3f} +- {fit.se_slope:.3f}",
        f"-0.5 within {k:.2f} SE",
        dict(
            slope=fit.slope,
            se_slope=fit.se_slope,
            intercept=fit.intercept,
            z=z,
            factors=list(factors),
            se=[math.exp(v) for v in y],
            se_of_log_se=se_y,
        ),
    )


# ---- the experiments --------------------------------------------------------------------------------
def run_shards(problem: Problem, s: Settings, seed: int, advance) -> dict:
    """K shards of B_E units, each probed with both entropy weightings along the same fixed v (with the
    second order: delta_h2 and the forecast too), and for the token-level entropy (``TOKEN``, also with
    the second order).

    Also with the founding note's estimator (``x_estimator="seed"``, no pathwise term), biased for
    "token-mean" with variable lengths (docs/design.md section 4): the control that the unbiasedness check
    can fail.
    """
    probes = {
        w: _probe(problem, entropy="sequence", entropy_weighting=w, second_order=True) for w in WEIGHTINGS
    }
    probes[CONTROL] = _probe(problem, entropy="sequence", entropy_weighting="token-mean", x_estimator="seed")
    # the trainers' token-level entropy (the default), through run(), with its second order
    probes[TOKEN] = _probe(problem, entropy="token", second_order=True)
    out = {w: dict(delta_h1=[], var=[], se=[], s=[], delta_h2=[], forecast=[]) for w in probes}
    for k in range(s.n_shards):
        batch = sample_enumerated(problem.policy, s.shard_units, s.group_size, seed=_seed(seed, 2, k))
        for w, probe in probes.items():
            r = probe.run(eval_batch=batch, direction=problem.v)
            out[w]["delta_h1"].append(r.delta_h1)
            out[w]["var"].append(r.var_cond_e)
            out[w]["se"].append(r.se_cond_e)
            out[w]["s"].extend(r.per_unit.tolist())
            if r.forecast is not None:
                out[w]["delta_h2"].append(r.delta_h2)
                out[w]["forecast"].append(r.forecast)
        advance()
    return out


def run_scaling(problem: Problem, s: Settings, seed: int, advance) -> list[list[float]]:
    """Predicted Var_E of independent shards of B_E = c * scale_units units, R per factor c."""
    probe = _probe(problem, entropy="sequence")  # the SE scaling of the sequence functional's s_n
    out = []
    for c in s.scale_factors:
        out.append([])
        for r in range(s.scale_replicates):
            batch = sample_enumerated(
                problem.policy, c * s.scale_units, s.group_size, seed=_seed(seed, 3, c, r)
            )
            out[-1].append(probe.run(eval_batch=batch, direction=problem.v).var_cond_e)
            advance(c)
    return out


def zero_advantage_check(problem: Problem, s: Settings, seed: int) -> Check:
    """Advantages all zero (given as zeros, or constant rewards under GRPO): everything exactly 0."""
    u = problem.update_batch
    cases = {
        "advantages=0": RolloutBatch(
            u.input_ids, u.attention_mask, u.response_mask, u.group_ids, advantages=torch.zeros(u.n_sequences)
        ),
        "constant rewards": RolloutBatch(
            u.input_ids,
            u.attention_mask,
            u.response_mask,
            u.group_ids,
            rewards=torch.full((u.n_sequences,), 0.7),
        ),
    }
    eval_batch = sample_enumerated(problem.policy, s.shard_units, s.group_size, seed=_seed(seed, 4))
    probe = EntropyProbe(
        problem.policy, config=ProbeConfig(lr=problem.lr, entropy="sequence")
    )  # with se_total
    figures, ok = {}, True
    for label, batch in cases.items():
        v_max = max(float(t.abs().max()) for t in probe.update_direction(batch).values())
        r = probe.run(batch, eval_batch, truth=True)
        got = dict(
            v_max_abs=v_max,
            delta_h1=r.delta_h1,
            se_cond_e=r.se_cond_e,
            se_jackknife=r.se_jackknife,
            se_total=r.se_total,
            truth_delta_h=r.truth.delta_h,
        )
        figures[label] = got
        ok = ok and all(value == 0.0 for value in got.values())  # exactly zero, no tolerance
    worst = max(abs(x) for got in figures.values() for x in got.values())
    return Check(
        "zero advantages: v, dH1, SEs, truth", ok, f"max |value| = {worst:.1e}", "exactly 0", figures
    )


def truth_checks(problem: Problem, s: Settings, seed: int, k: float) -> tuple[list[Check], dict]:
    """delta_h_true(alpha) against the exact change and against alpha * delta_h1 as alpha shrinks."""
    alphas = list(s.alphas)
    batch = sample_enumerated(problem.policy, s.truth_units, s.group_size, seed=_seed(seed, 5))
    probe = _probe(problem, truth_alphas=tuple(alphas), entropy="sequence")  # exact: token-mean weighting
    r = probe.run(eval_batch=batch, direction=problem.v, truth=True)
    t = r.truth
    lr, slope = problem.lr, problem.exact_slope["token-mean"]
    exact = [exact_entropy_at(problem.policy, problem.v, a * lr) - problem.entropy for a in alphas]
    # 5a. Deterministic. Taylor: r(alpha) = dH(alpha) / (alpha eta grad H . v) = 1 + c alpha + O(alpha^2),
    # so halving a small alpha halves r - 1, while a limit other than 1 would leave r - 1 unchanged.
    # Pass when halving alpha from 1/32 to 1/64 takes |r - 1| below 3/4 of its value (halfway between
    # the two hypotheses), plus the fp32 rounding of r: H carries ~2 ulps (measured), i.e.
    # 4 * 2^-24 * max(H, 1) on each of H(theta') and H(theta), divided by the tangent alpha eta grad H . v.
    fine = [2.0**-j for j in range(6, -1, -1)]  # 1/64 ... 1, exact enumeration is cheap
    fine_ratio = [
        (exact_entropy_at(problem.policy, problem.v, a * lr) - problem.entropy) / (a * lr * slope)
        for a in fine
    ]
    rounding = [2 * 4 * 2.0**-24 * max(problem.entropy, 1.0) / abs(a * lr * slope) for a in fine]
    dev_small, dev_twice = abs(fine_ratio[0] - 1), abs(fine_ratio[1] - 1)
    bound = 0.75 * dev_twice + rounding[0] + 0.75 * rounding[1]
    taylor = Check(
        "truth (exact): change / tangent -> 1",
        dev_small <= bound,
        f"|r-1| {dev_twice:.4f} at a=1/32 -> {dev_small:.4f} at a=1/64; r = {fine_ratio[-1]:.3f} at a=1",
        f"<= {bound:.4f}",
        dict(alphas=fine, exact_ratio=fine_ratio, rounding=rounding, bound=bound),
    )
    # 5b. The importance-weighted truth estimates the exact change without bias; its SE is over E units.
    z_exact = [(d - e) / se for d, e, se in zip(t.delta_h_at, exact, t.se_at)]
    worst = max(range(len(alphas)), key=lambda i: abs(z_exact[i]))
    weighted = Check(
        "truth (importance weights) vs exact change, every alpha",
        max(abs(z) for z in z_exact) <= k,
        f"max |z| = {abs(z_exact[worst]):.2f} (a={alphas[worst]:g})",
        f"|z| <= {k:.2f}",
        dict(alphas=alphas, delta_h_true=t.delta_h_at, se=t.se_at, exact=exact, z=z_exact, ess=t.ess_at),
    )
    # 5c. On the same E the truth's derivative in alpha at 0 is the forecast's (the s_n): truth - alpha dH1
    # is second order in alpha, not noise of first order. The slope of log |truth - alpha dH1| against
    # log alpha must be nearer 2 than 1 or 3 (as in the order check); a truth with another baseline
    # (a self-normalised ratio) leaves a first-order difference and a slope near 1 at small alpha.
    pred = [a * r.delta_h1 for a in alphas]
    ratio = [d / p for d, p in zip(t.delta_h_at, pred)]
    gap = [abs(d - p) for d, p in zip(t.delta_h_at, pred)]
    log_gap = [math.log(max(g, 1e-300)) for g in gap]  # a gap of exactly 0 (no curvature) fails the check
    order = fit_slope([math.log(a) for a in alphas], log_gap, [0.0] * len(gap)).slope
    agree = Check(
        "truth - alpha dH1 on the same E: order 2",
        abs(order - 2.0) < 0.5,
        f"slope {order:.2f}; truth / (a dH1) = {ratio[0]:.3f} at a={alphas[0]:g}, "
        f"{ratio[-1]:.3f} at a={alphas[-1]:g}",
        "2 -+ 0.5",
        dict(
            alphas=alphas,
            ratio=ratio,
            gap=gap,
            slope=order,
            se_diff=t.se_diff_at,
            delta_h1=r.delta_h1,
            se_cond_e=r.se_cond_e,
            eval_units=s.truth_units,
        ),
    )
    grid = [j / 40 for j in range(41)]  # the exact curve for the plot
    plot = dict(
        alphas=alphas,
        exact=exact,
        truth=t.delta_h_at,
        truth_se=t.se_at,
        delta_h1=r.delta_h1,
        se_cond_e=r.se_cond_e,
        exact_tangent=lr * slope,
        ratio=ratio,
        fine=fine,
        fine_ratio=fine_ratio,
        ratio_se=[sd / abs(p) for sd, p in zip(t.se_diff_at, pred)],
        grid=grid,
        curve=[exact_entropy_at(problem.policy, problem.v, a * lr) - problem.entropy for a in grid],
    )
    return [taylor, weighted, agree], plot
