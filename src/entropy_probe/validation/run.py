"""``entropy-probe validate``: is the forecast unbiased, and are its error bars calibrated?

Run ``entropy-probe validate --out runs/validate`` (about a minute on 2 CPU cores), ``--quick`` for a
smoke run of a few seconds, ``--seed N`` for another policy and other samples. It prints a pass/fail
table, writes ``validation.json`` and three PNG plots to ``--out`` and exits with status 1 when a check
fails. docs/validation.md explains every check and how to read the plots.

Everything runs on the built-in ``TabularPolicy`` (toy.py), whose responses can be listed: E is
sampled exactly (``sample_enumerated``) and the true entropy and its gradient come from enumeration,
so each estimate of the probe is compared with the exact number it estimates. U is sampled once and
fixed; v is the note's Adam-preconditioned direction. The checks (DESIGN section 8):

1. calibration: over K independent E shards, the empirical variance of delta_h1 matches the mean
   predicted Var_E (chi-square interval), and the 95% intervals cover the exact value ~95% of the time;
2. SE scaling: with B_E scaled by c = 1, 2, 4, 8 the SE falls as c^(-1/2);
3. zero advantages: v = 0 and delta_h1, every SE and the truth are exactly 0;
4. unbiasedness: the mean of delta_h1 over the shards equals the exact eta * grad H . v, for both
   entropy weightings (responses have lengths 1 to 3);
5. truth: delta_h_true(alpha) / (alpha * delta_h1) -> 1 as alpha -> 0, with H(theta + alpha eta v)
   by exact enumeration and by the probe's importance-weighted truth.

Tolerances are quantiles of each statistic's sampling distribution at a family-wise level of 1%
(validation_stats.py), so a correct probe fails the whole table about once in a hundred seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .batch import RolloutBatch
from .config import ProbeConfig
from .logprobs import WEIGHTINGS
from .probe import EntropyProbe
from .toy import TabularPolicy, exact_directional_derivative, exact_entropy, sample_enumerated
from .truth import stepped_parameters
from .validation_stats import (FAMILY_LEVEL, chi2_ratio_interval, excess_kurtosis, fit_slope, skewness,
                               studentized_coverage, tolerance_k, wilson_interval)

Z95 = 1.959963984540054  # the probe's interval is delta_h1 -+ 1.96 SE (ProbeResult.interval)
CONTROL = "seed estimator"  # the note's biased X_n, run on the same shards as a negative control


@dataclass(frozen=True)
class Settings:
    """Sizes of the experiments. B_E and B_U count units (prompts), each with ``group_size`` responses."""

    n_shards: int  # K independent E shards for calibration and unbiasedness
    shard_units: int  # B_E of one shard
    scale_units: int  # B_E at c = 1 in the SE-scaling check
    scale_replicates: int  # independent shards per scale factor c
    truth_units: int  # B_E of the truth check
    group_size: int = 4
    update_units: int = 32
    scale_factors: tuple[int, ...] = (1, 2, 4, 8)
    alphas: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
    policy_scale: float = 2.0  # logits ~ N(0, 2^2): a peaked policy, so steps move entropy visibly
    curvature: float = 0.2  # eta is chosen so the exact H(theta + eta v) departs 20% from the tangent


# B_E = 32 per shard: the interval delta_h1 -+ 1.96 SE, whose SE is estimated from the same skewed s_n,
# covers less than 95% by O(1/B_E) (measured for the "sum" weighting: 0.90 at B_E = 16, 0.94 at 32);
# the coverage check tests the expected finite-B_E coverage, which at 32 is still within 2% of 0.95.
FULL = Settings(n_shards=300, shard_units=32, scale_units=16, scale_replicates=24, truth_units=1024)
QUICK = Settings(n_shards=100, shard_units=32, scale_units=8, scale_replicates=10, truth_units=192)


@dataclass
class Check:
    """One row of the table: what was measured, against which tolerance, and the numbers behind it."""

    name: str
    passed: bool
    measured: str
    tolerance: str
    figures: dict = field(default_factory=dict)


# ---- the problem: a policy, a fixed U, its direction v, and the exact answers -----------------------
@dataclass
class Problem:
    """What every check shares: the policy, the fixed U, its direction v, eta and the exact answers."""

    policy: TabularPolicy
    update_batch: RolloutBatch
    v: dict[str, torch.Tensor]
    lr: float
    entropy: float  # exact H(theta), token-mean weighting
    exact_slope: dict[str, float]  # exact grad H . v per weighting (delta_h1 estimates lr times it)


def _seed(seed: int, *offsets: int) -> int:
    """Distinct, reproducible sampling seeds for every experiment of one harness seed."""
    return 1_000_003 * seed + sum(o * 10_007 ** i for i, o in enumerate(offsets, start=1))


def exact_entropy_at(policy: TabularPolicy, v: dict[str, torch.Tensor], step: float,
                     weighting: str = "token-mean") -> float:
    """Exact ``H(theta + step * v)`` by enumeration, on a copy of the policy (the original untouched)."""
    stepped = copy.deepcopy(policy)
    with torch.no_grad():
        for name, value in stepped_parameters(dict(policy.named_parameters()), v, step).items():
            stepped.get_parameter(name).copy_(value)
        return float(exact_entropy(stepped, weighting))


def choose_lr(policy: TabularPolicy, v: dict[str, torch.Tensor], slope: float, entropy: float,
              curvature: float) -> float:
    """The smallest eta = 1e-3 * sqrt(2)^j whose exact change departs from the tangent by ``curvature``.

    The truth check needs a step whose nonlinearity is visible at alpha = 1 and vanishes as alpha -> 0.
    """
    lr = 1e-3
    for _ in range(40):
        ratio = (exact_entropy_at(policy, v, lr) - entropy) / (lr * slope)
        if abs(ratio - 1.0) >= curvature:
            return lr
        lr *= math.sqrt(2.0)
    return lr


def build_problem(seed: int, s: Settings) -> Problem:
    policy = TabularPolicy(seed=seed, scale=s.policy_scale)
    update_batch = sample_enumerated(policy, n_units=s.update_units, group_size=s.group_size, seed=_seed(seed, 1))
    # Without optimizer state Adam's preconditioner is that of its own first step; v does not depend on lr.
    v = EntropyProbe(policy, config=ProbeConfig(lr=1.0)).update_direction(update_batch)
    exact_slope = {w: exact_directional_derivative(policy, v, w) for w in WEIGHTINGS}
    with torch.no_grad():
        entropy = float(exact_entropy(policy))
    lr = choose_lr(policy, v, exact_slope["token-mean"], entropy, s.curvature)
    return Problem(policy, update_batch, v, lr, entropy, exact_slope)


def _probe(problem: Problem, **config) -> EntropyProbe:
    return EntropyProbe(problem.policy, config=ProbeConfig(lr=problem.lr, unconditional_se=False, **config))


# ---- the pure statistics of each check (unit-tested on synthetic data) -----------------------------
def _var(x: list[float]) -> float:
    m = sum(x) / len(x)
    return sum((xi - m) ** 2 for xi in x) / (len(x) - 1)


def variance_check(name: str, delta_h1: list[float], var_pred: list[float], unit_kurtosis: float,
                   shard_units: int, k: float) -> Check:
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
    return Check(name, lo <= ratio <= hi, f"ratio {ratio:.3f}", f"[{lo:.3f}, {hi:.3f}]",
                 dict(ratio=ratio, interval=[lo, hi], empirical_var=empirical, mean_predicted_var=predicted,
                      chi2_df=df, unit_excess_kurtosis=unit_kurtosis, rel_se_predicted=rel_pred, shards=n))


def coverage_check(name: str, delta_h1: list[float], se: list[float], exact: float, shard_units: int,
                   unit_skew: float, unit_kurtosis: float, k: float) -> Check:
    """Share of shards whose 95% interval covers the exact value, against the coverage it should have.

    Each shard covers independently with probability p, so the count is Binomial(K, p); the Wilson
    score interval at level k holds p exactly when the score test of p accepts. The p to test is not
    quite 0.95: the SE is estimated from the same B_E skewed s_n, which lowers the coverage of a 1.96-SE
    interval by O(1/B_E) (0.941 for normal s_n at B_E = 32, about 0.93 for the skewed s_n of the "sum"
    weighting). ``studentized_coverage`` gives it from the measured skewness and kurtosis of the s_n;
    its own error, O(1/B_E^2) (< 0.007 at B_E = 32 even for exponential s_n), is far inside the interval.
    """
    covered = sum(abs(d - exact) <= Z95 * s for d, s in zip(delta_h1, se))
    n = len(delta_h1)
    expected = studentized_coverage(Z95, shard_units, unit_skew, unit_kurtosis)
    lo, hi = wilson_interval(covered, n, k)
    return Check(name, lo <= expected <= hi, f"{covered}/{n} = {covered / n:.3f}",
                 f"{expected:.3f} in [{lo:.3f}, {hi:.3f}]",
                 dict(coverage=covered / n, covered=covered, shards=n, nominal=0.95, expected=expected,
                      wilson=[lo, hi], unit_skewness=unit_skew, unit_excess_kurtosis=unit_kurtosis))


def unbiased_check(name: str, delta_h1: list[float], exact: float, k: float) -> Check:
    """z of the mean over K shards against the exact value; the shards are iid, so SE = sd / sqrt(K)."""
    n = len(delta_h1)
    mean = sum(delta_h1) / n
    se = math.sqrt(_var(delta_h1) / n)
    z = (mean - exact) / se
    return Check(name, abs(z) <= k, f"z = {z:+.2f} ({mean:.3e} vs {exact:.3e})", f"|z| <= {k:.2f}",
                 dict(mean=mean, exact=exact, se_of_mean=se, z=z,
                      relative_error=(mean - exact) / exact if exact != 0 else None))


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
    return Check(name, abs(z) <= k, f"slope {fit.slope:+.3f} +- {fit.se_slope:.3f}", f"-0.5 within {k:.2f} SE",
                 dict(slope=fit.slope, se_slope=fit.se_slope, intercept=fit.intercept, z=z, factors=list(factors),
                      se=[math.exp(v) for v in y], se_of_log_se=se_y))


# ---- the experiments --------------------------------------------------------------------------------
def run_shards(problem: Problem, s: Settings, seed: int, advance) -> dict:
    """K shards of B_E units, each probed with both entropy weightings along the same fixed v.

    Also with the founding note's estimator (``x_estimator="seed"``, no pathwise term), biased for
    "token-mean" with variable lengths (DESIGN section 3): the control that the unbiasedness check can fail.
    """
    probes = {w: _probe(problem, entropy_weighting=w) for w in WEIGHTINGS}
    probes[CONTROL] = _probe(problem, entropy_weighting="token-mean", x_estimator="seed")
    out = {w: dict(delta_h1=[], var=[], se=[], s=[]) for w in probes}
    for k in range(s.n_shards):
        batch = sample_enumerated(problem.policy, s.shard_units, s.group_size, seed=_seed(seed, 2, k))
        for w, probe in probes.items():
            r = probe.run(eval_batch=batch, direction=problem.v)
            out[w]["delta_h1"].append(r.delta_h1)
            out[w]["var"].append(r.var_cond_e)
            out[w]["se"].append(r.se_cond_e)
            out[w]["s"].extend(r.per_unit.tolist())
        advance()
    return out


def run_scaling(problem: Problem, s: Settings, seed: int, advance) -> list[list[float]]:
    """Predicted Var_E of independent shards of B_E = c * scale_units units, R per factor c."""
    probe = _probe(problem)
    out = []
    for c in s.scale_factors:
        out.append([])
        for r in range(s.scale_replicates):
            batch = sample_enumerated(problem.policy, c * s.scale_units, s.group_size, seed=_seed(seed, 3, c, r))
            out[-1].append(probe.run(eval_batch=batch, direction=problem.v).var_cond_e)
            advance(c)
    return out


def zero_advantage_check(problem: Problem, s: Settings, seed: int) -> Check:
    """Advantages all zero (given as zeros, or constant rewards under GRPO): everything exactly 0."""
    u = problem.update_batch
    cases = {
        "advantages=0": RolloutBatch(u.input_ids, u.attention_mask, u.response_mask, u.group_ids,
                                     advantages=torch.zeros(u.n_sequences)),
        "constant rewards": RolloutBatch(u.input_ids, u.attention_mask, u.response_mask, u.group_ids,
                                         rewards=torch.full((u.n_sequences,), 0.7)),
    }
    eval_batch = sample_enumerated(problem.policy, s.shard_units, s.group_size, seed=_seed(seed, 4))
    probe = EntropyProbe(problem.policy, config=ProbeConfig(lr=problem.lr))  # with se_total
    figures, ok = {}, True
    for label, batch in cases.items():
        v_max = max(float(t.abs().max()) for t in probe.update_direction(batch).values())
        r = probe.run(batch, eval_batch, truth=True)
        got = dict(v_max_abs=v_max, delta_h1=r.delta_h1, se_cond_e=r.se_cond_e, se_jackknife=r.se_jackknife,
                   se_total=r.se_total, truth_delta_h=r.truth.delta_h)
        figures[label] = got
        ok = ok and all(value == 0.0 for value in got.values())  # exactly zero, no tolerance
    worst = max(abs(x) for got in figures.values() for x in got.values())
    return Check("zero advantages: v, dH1, SEs, truth", ok, f"max |value| = {worst:.1e}", "exactly 0", figures)


def truth_checks(problem: Problem, s: Settings, seed: int, k: float) -> tuple[list[Check], dict]:
    """delta_h_true(alpha) against the exact change and against alpha * delta_h1 as alpha shrinks."""
    alphas = list(s.alphas)
    batch = sample_enumerated(problem.policy, s.truth_units, s.group_size, seed=_seed(seed, 5))
    r = _probe(problem, truth_alphas=tuple(alphas)).run(eval_batch=batch, direction=problem.v, truth=True)
    t = r.truth
    lr, slope = problem.lr, problem.exact_slope["token-mean"]
    exact = [exact_entropy_at(problem.policy, problem.v, a * lr) - problem.entropy for a in alphas]
    # 5a. Deterministic. Taylor: r(alpha) = dH(alpha) / (alpha eta grad H . v) = 1 + c alpha + O(alpha^2),
    # so halving a small alpha halves r - 1, while a limit other than 1 would leave r - 1 unchanged.
    # Pass when halving alpha from 1/32 to 1/64 takes |r - 1| below 3/4 of its value (halfway between
    # the two hypotheses), plus the fp32 rounding of r: H carries ~2 ulps (measured), i.e.
    # 4 * 2^-24 * max(H, 1) on each of H(theta') and H(theta), divided by the tangent alpha eta grad H . v.
    fine = [2.0 ** -j for j in range(6, -1, -1)]  # 1/64 ... 1, exact enumeration is cheap
    fine_ratio = [(exact_entropy_at(problem.policy, problem.v, a * lr) - problem.entropy) / (a * lr * slope)
                  for a in fine]
    rounding = [2 * 4 * 2.0 ** -24 * max(problem.entropy, 1.0) / abs(a * lr * slope) for a in fine]
    dev_small, dev_twice = abs(fine_ratio[0] - 1), abs(fine_ratio[1] - 1)
    bound = 0.75 * dev_twice + rounding[0] + 0.75 * rounding[1]
    taylor = Check("truth (exact): change / tangent -> 1", dev_small <= bound,
                   f"|r-1| {dev_twice:.4f} at a=1/32 -> {dev_small:.4f} at a=1/64; r = {fine_ratio[-1]:.3f} at a=1",
                   f"<= {bound:.4f}", dict(alphas=fine, exact_ratio=fine_ratio, rounding=rounding, bound=bound))
    # 5b. The importance-weighted truth estimates the exact change; its jackknife SE is over E units
    # (the SNIS bias is O(1/N) with N = 4 * truth_units sequences, far below that SE).
    z_exact = [(d - e) / se for d, e, se in zip(t.delta_h_at, exact, t.se_at)]
    worst = max(range(len(alphas)), key=lambda i: abs(z_exact[i]))
    snis = Check("truth (SNIS) vs exact change, every alpha", max(abs(z) for z in z_exact) <= k,
                 f"max |z| = {abs(z_exact[worst]):.2f} (a={alphas[worst]:g})", f"|z| <= {k:.2f}",
                 dict(alphas=alphas, delta_h_true=t.delta_h_at, se=t.se_at, exact=exact, z=z_exact, ess=t.ess_at))
    # 5c. On the same E, truth - alpha * delta_h1 has the jackknife SE se_diff (both use the same units);
    # the two agree to first order, so at the smallest alpha their difference is noise: |z| <= k.
    pred = [a * r.delta_h1 for a in alphas]
    ratio = [d / p for d, p in zip(t.delta_h_at, pred)]
    z_pred = [(d - p) / sd for d, p, sd in zip(t.delta_h_at, pred, t.se_diff_at)]
    agree = Check("truth / (alpha dH1) -> 1 at smallest alpha", abs(z_pred[0]) <= k,
                  f"{ratio[0]:.3f} (z = {z_pred[0]:+.2f}) at a={alphas[0]:g}; {ratio[-1]:.3f} at a={alphas[-1]:g}",
                  f"|z| <= {k:.2f}", dict(alphas=alphas, ratio=ratio, z=z_pred, se_diff=t.se_diff_at,
                                          delta_h1=r.delta_h1, se_cond_e=r.se_cond_e, eval_units=s.truth_units))
    grid = [j / 40 for j in range(41)]  # the exact curve for the plot
    plot = dict(alphas=alphas, exact=exact, truth=t.delta_h_at, truth_se=t.se_at, delta_h1=r.delta_h1,
                se_cond_e=r.se_cond_e, exact_tangent=lr * slope, ratio=ratio, fine=fine, fine_ratio=fine_ratio,
                ratio_se=[sd / abs(p) for sd, p in zip(t.se_diff_at, pred)], grid=grid,
                curve=[exact_entropy_at(problem.policy, problem.v, a * lr) - problem.entropy for a in grid])
    return [taylor, snis, agree], plot


# ---- the harness ------------------------------------------------------------------------------------
def run_validation(seed: int, settings: Settings, out: Path, console: Console) -> dict:
    """Every check, the plots and validation.json in ``out``; returns the report (JSON-ready)."""
    from .validation_plots import calibration_plot, se_scaling_plot, truth_plot

    start = time.perf_counter()
    s = settings
    n_tests = 2 * len(WEIGHTINGS) + 1 + len(WEIGHTINGS) + len(s.alphas) + 1  # the statistical tests below
    k = tolerance_k(n_tests)
    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        setup = progress.add_task("policy, U, v, exact answers", total=1)
        problem = build_problem(seed, s)
        progress.advance(setup)
        task = progress.add_task(f"E shards (K={s.n_shards})", total=s.n_shards)
        shards = run_shards(problem, s, seed, lambda: progress.advance(task))
        task = progress.add_task("SE scaling (c = 1, 2, 4, 8)", total=s.scale_replicates * sum(s.scale_factors))
        scaling = run_scaling(problem, s, seed, lambda c: progress.advance(task, c))
        task = progress.add_task("zero advantages", total=1)
        zero = zero_advantage_check(problem, s, seed)
        progress.advance(task)
        task = progress.add_task("truth sweep over alpha", total=1)
        truth, truth_data = truth_checks(problem, s, seed, k)
        progress.advance(task)

    exact = {w: problem.lr * problem.exact_slope[w] for w in WEIGHTINGS}
    checks: list[Check] = []
    for w in WEIGHTINGS:
        d = shards[w]
        kurt, skew = excess_kurtosis(d["s"]), skewness(d["s"])  # of the s_n, pooled over the shards
        checks.append(variance_check(f"variance ratio ({w})", d["delta_h1"], d["var"], kurt, s.shard_units, k))
        checks.append(coverage_check(f"coverage ({w})", d["delta_h1"], d["se"], exact[w], s.shard_units, skew,
                                     kurt, k))
    checks.append(slope_check("SE scaling: slope of log SE vs log c", list(s.scale_factors), scaling, k))
    checks.append(zero)
    checks += [unbiased_check(f"unbiased vs exact ({w})", shards[w]["delta_h1"], exact[w], k) for w in WEIGHTINGS]
    checks += truth
    # Not a check of the probe (it counts neither in the verdict nor in k): the same unbiasedness test
    # applied to a known-biased estimator must reject it, or the test would have no power here.
    control = unbiased_check("control: x_estimator='seed' (token-mean) is biased", shards[CONTROL]["delta_h1"],
                             exact["token-mean"], k)
    control.passed = not control.passed  # "passed" = the bias was detected
    control.tolerance = f"|z| > {k:.2f}"

    out.mkdir(parents=True, exist_ok=True)
    by_name = {c.name: asdict(c) for c in checks}
    plots = {"calibration": out / "calibration.png", "se_scaling": out / "se_scaling.png",
             "truth_vs_prediction": out / "truth_vs_prediction.png"}
    calibration_plot(plots["calibration"], {w: shards[w] for w in WEIGHTINGS}, exact, by_name, s.shard_units)
    se_scaling_plot(plots["se_scaling"], list(s.scale_factors), s.scale_units, scaling,
                    by_name["SE scaling: slope of log SE vs log c"])
    truth_plot(plots["truth_vs_prediction"], truth_data, problem.lr, s.truth_units)
    report = dict(
        passed=all(c.passed for c in checks), seed=seed, runtime_s=time.perf_counter() - start, settings=asdict(s),
        tolerance=dict(family_level=FAMILY_LEVEL, statistical_tests=n_tests, k=k),
        problem=dict(lr=problem.lr, entropy=problem.entropy, exact_grad_h_dot_v=problem.exact_slope,
                     exact_delta_h1=exact, update_units=problem.update_batch.n_units, direction="adam-preconditioned"),
        checks=[asdict(c) for c in checks], controls=[asdict(control)],
        plots={name: str(p) for name, p in plots.items()})
    (out / "validation.json").write_text(json.dumps(report, indent=2))
    return report


def print_table(report: dict, console: Console) -> None:
    table = Table(title=f"entropy-probe validate (seed {report['seed']}, {report['runtime_s']:.1f} s; "
                        f"k = {report['tolerance']['k']:.2f} for a 1% family-wise level)")
    table.add_column("check")
    table.add_column("measured")
    table.add_column("tolerance")
    table.add_column("result", justify="center")
    for c in report["checks"]:
        table.add_row(c["name"], c["measured"], c["tolerance"],
                      "[bold green]PASS[/]" if c["passed"] else "[bold red]FAIL[/]")
    table.add_section()
    for c in report.get("controls", []):  # informational: does not change the verdict
        table.add_row(c["name"], c["measured"], c["tolerance"],
                      "[yellow]detected[/]" if c["passed"] else "[yellow]missed[/]")
    console.print(table)
    verdict = "[bold green]all checks passed[/]" if report["passed"] else "[bold red]some checks FAILED[/]"
    console.print(f"{verdict}; validation.json and plots in {Path(report['plots']['calibration']).parent}")


def main(argv: list[str] | None = None) -> int:
    """``entropy-probe validate [--out DIR] [--seed N] [--quick]``; returns 0 when every check passes."""
    parser = argparse.ArgumentParser(
        prog="entropy-probe validate",
        description="Check on a built-in, exactly enumerable policy that the probe's forecast is unbiased and "
                    "its standard errors are calibrated (DESIGN section 8). Writes validation.json and PNG "
                    "plots; exits with status 1 when a check fails.")
    parser.add_argument("--out", type=Path, default=Path("runs/validate"),
                        help="folder for validation.json, calibration.png, se_scaling.png, truth_vs_prediction.png "
                             "(default: runs/validate)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the policy and of every sample; each seed is a new problem (default: 0)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smaller experiments (K={QUICK.n_shards} shards of {QUICK.shard_units} units): "
                             "about 15 s of CPU, same checks, wider tolerances")
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    console = Console()
    torch.set_num_threads(1)  # tensors of a few hundred numbers: more threads only add overhead
    report = run_validation(args.seed, QUICK if args.quick else FULL, args.out, console)
    print_table(report, console)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
