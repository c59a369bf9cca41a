"""``entropy-probe validate``: is the forecast unbiased, and are its error bars calibrated?

Run ``entropy-probe validate --out runs/validate`` (about a minute on 2 CPU cores), ``--quick`` for a
smoke run of a few seconds, ``--seed N`` for another policy and other samples. It prints a pass/fail
table, writes ``validation.json`` and three PNG plots to ``--out`` and exits with status 1 when a check
fails. docs/validation.md explains every check and how to read the plots.

Everything runs on the built-in ``TabularPolicy`` (``entropy_probe.toy``), whose responses can be listed: E is
sampled exactly (``sample_enumerated``) and the true entropy and its gradient come from enumeration,
so each estimate of the probe is compared with the exact number it estimates. U is sampled once and
fixed; v is the note's Adam-preconditioned direction. The checks (docs/design.md section 12):

1. calibration: over K independent E shards, the empirical variance of delta_h1 matches the mean
   predicted Var_E (chi-square interval), and the 95% intervals cover the exact value ~95% of the time;
2. SE scaling: with B_E scaled by c = 1, 2, 4, 8 the SE falls as c^(-1/2);
3. zero advantages: v = 0 and delta_h1, every SE and the truth are exactly 0;
4. unbiasedness: the mean of delta_h1 over the shards equals the exact eta * grad H . v, for both
   entropy weightings (responses have lengths 1 to 3);
5. truth: delta_h_true(alpha) / (alpha * delta_h1) -> 1 as alpha -> 0, with H(theta + alpha eta v)
   by exact enumeration and by the probe's importance-weighted truth;
6. second order (docs/design.md section 8): the mean delta_h2 over the shards equals the exact
   (eta^2/2) v^T grad^2 H v, both weightings and the token level; the error |truth - forecast| falls
   as alpha^3 (first order: alpha^2) on a log-log fit; and by_group sums exactly to delta_h1 (section 13).
7. se_total (docs/design.md section 7): over independent (U, E) pairs, var(delta_h1) / mean(se_total^2) in
   its chi-square band for sgd, Adam-preconditioned fresh and warm, optimizer-step warm;
8. the skew-aware ``result.interval()`` covers the exact change at its level on the skewed case
   ("sum" weighting, temperature 0.7, B_E = 16 and 32) and on an easy one.

Tolerances are quantiles of each statistic's sampling distribution at a family-wise level of 1%
(``validation/stats.py``), so a correct probe fails the whole table about once in a hundred seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ..logprobs import WEIGHTINGS
from ..toy import exact_token_derivative, exact_token_second_derivative
from .calibration import (
    SE_TOTAL_CASES,
    coverage_floor_check,
    interval_coverage,
    se_total_check,
    se_total_pairs,
)
from .checks import (
    coverage_check,
    run_scaling,
    run_shards,
    slope_check,
    truth_checks,
    unbiased_check,
    variance_check,
    zero_advantage_check,
)
from .problem import CONTROL, FULL, QUICK, TOKEN, Check, Settings, build_problem
from .second_order import by_group_check, exact_second_terms, forecast_at_full_step, order_check
from .stats import FAMILY_LEVEL, excess_kurtosis, skewness, tolerance_k
from .token_level import TOKEN_TESTS, token_checks

# (weighting, temperature, B_E, target coverage of the 95% interval): the skewed case, and an easy one
INTERVAL_CASES = (("sum", 0.7, 16, 0.92), ("sum", 0.7, 32, 0.93), ("token-mean", 1.0, 32, 0.93))


# ---- the harness ------------------------------------------------------------------------------------
def run_validation(seed: int, settings: Settings, out: Path, console: Console) -> dict:
    """Every check, the plots and validation.json in ``out``; returns the report (JSON-ready)."""
    start = time.perf_counter()
    s = settings
    n_tests = statistical_tests(s)
    k = tolerance_k(n_tests)
    problem, m = _measure(seed, s, k, console)
    exact = {w: problem.lr * problem.exact_slope[w] for w in WEIGHTINGS}
    checks, exact_h2 = _checks(problem, m, exact, s, k, seed)
    full_step = forecast_at_full_step(
        problem, m.shards["token-mean"]["forecast"], m.shards["token-mean"]["delta_h1"]
    )
    control = _control(m.shards, exact, k)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, m, exact, {c.name: asdict(c) for c in checks}, s, problem.lr)
    report = dict(
        passed=all(c.passed for c in checks),
        seed=seed,
        runtime_s=time.perf_counter() - start,
        settings=asdict(s),
        tolerance=dict(family_level=FAMILY_LEVEL, statistical_tests=n_tests, k=k),
        problem=dict(
            lr=problem.lr,
            entropy=problem.entropy,
            exact_grad_h_dot_v=problem.exact_slope,
            exact_delta_h1=exact,
            exact_delta_h2=exact_h2,
            update_units=problem.update_batch.n_units,
            direction="adam-preconditioned",
            full_step=full_step,
        ),
        checks=[asdict(c) for c in checks],
        controls=[asdict(control)],
        plots={name: str(p) for name, p in plots.items()},
    )
    (out / "validation.json").write_text(json.dumps(report, indent=2))
    return report


def statistical_tests(s: Settings) -> int:
    """The statistical tests of a run (the second-order unbiasedness adds one per weighting and one for the
    token level): k's family."""
    return (
        2 * len(WEIGHTINGS)
        + 1
        + 2 * len(WEIGHTINGS)
        + len(s.alphas)
        + 1
        + len(SE_TOTAL_CASES)
        + len(INTERVAL_CASES)
        + 1
        + 1  # the token-level delta_h2
        + TOKEN_TESTS
    )


@dataclass
class Measured:
    """What the long loops of a run measured (``_measure``), before any verdict."""

    shards: dict
    scaling: list
    zero: Check
    truth: list
    truth_data: dict
    totals: list
    intervals: list


def _measure(seed: int, s: Settings, k: float, console: Console) -> tuple:
    """(the problem, ``Measured``): the shards, the SE scaling, the truth sweep, se_total and the
    interval coverage, under one progress display."""
    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        setup = progress.add_task("policy, U, v, exact answers", total=1)
        problem = build_problem(seed, s)
        progress.advance(setup)
        task = progress.add_task(f"E shards (K={s.n_shards})", total=s.n_shards)
        shards = run_shards(problem, s, seed, lambda: progress.advance(task))
        task = progress.add_task(
            "SE scaling (c = 1, 2, 4, 8)", total=s.scale_replicates * sum(s.scale_factors)
        )
        scaling = run_scaling(problem, s, seed, lambda c: progress.advance(task, c))
        task = progress.add_task("zero advantages", total=1)
        zero = zero_advantage_check(problem, s, seed)
        progress.advance(task)
        task = progress.add_task("truth sweep over alpha", total=1)
        truth, truth_data = truth_checks(problem, s, seed, k)
        progress.advance(task)
        task = progress.add_task(f"se_total ({s.total_pairs} (U, E) pairs x 4)", total=len(SE_TOTAL_CASES))
        totals = []
        for direction, warm in SE_TOTAL_CASES:
            data = se_total_pairs(direction, warm, s.total_pairs, *s.total_units, seed=seed)
            totals.append(se_total_check(direction, warm, data, k))
            progress.advance(task)
        task = progress.add_task(
            f"interval coverage ({s.interval_draws} draws x 3)", total=len(INTERVAL_CASES)
        )
        intervals = []
        for weighting, temperature, units, target in INTERVAL_CASES:
            covered, n = interval_coverage(weighting, temperature, units, s.interval_draws, seed=seed)
            name = f"interval coverage ({weighting}, T={temperature:g}, B_E={units})"
            intervals.append(coverage_floor_check(name, covered, n, target, k))
            progress.advance(task)
    return problem, Measured(shards, scaling, zero, truth, truth_data, totals, intervals)


def _checks(problem, m: Measured, exact: dict, s: Settings, k: float, seed: int) -> tuple[list[Check], dict]:
    """Every check of the verdict, in report order, and the exact delta_h2 per weighting."""
    checks: list[Check] = []
    for w in WEIGHTINGS:
        d = m.shards[w]
        kurt, skew = excess_kurtosis(d["s"]), skewness(d["s"])  # of the s_n, pooled over the shards
        checks.append(
            variance_check(f"variance ratio ({w})", d["delta_h1"], d["var"], kurt, s.shard_units, k)
        )
        checks.append(
            coverage_check(f"coverage ({w})", d["delta_h1"], d["se"], exact[w], s.shard_units, skew, kurt, k)
        )
    checks.append(slope_check("SE scaling: slope of log SE vs log c", list(s.scale_factors), m.scaling, k))
    checks.append(m.zero)
    checks += [
        unbiased_check(f"unbiased vs exact ({w})", m.shards[w]["delta_h1"], exact[w], k) for w in WEIGHTINGS
    ]
    checks += m.truth + m.totals + m.intervals
    exact_h2 = {w: exact_second_terms(problem, w)[1] for w in WEIGHTINGS}
    checks += [
        unbiased_check(f"delta_h2 unbiased vs exact ({w})", m.shards[w]["delta_h2"], exact_h2[w], k)
        for w in WEIGHTINGS
    ]
    checks += [order_check(problem), by_group_check(seed)]
    exact_token = problem.lr * exact_token_derivative(problem.policy, problem.v)
    checks.append(
        unbiased_check(
            "token: unbiased vs exact (run(), shards)", m.shards[TOKEN]["delta_h1"], exact_token, k
        )
    )
    exact_h2[TOKEN] = 0.5 * problem.lr**2 * exact_token_second_derivative(problem.policy, problem.v)
    checks.append(
        unbiased_check(
            "token: delta_h2 unbiased vs exact (run(), shards)",
            m.shards[TOKEN]["delta_h2"],
            exact_h2[TOKEN],
            k,
        )
    )
    checks += token_checks(problem.policy, problem.v, seed, k)  # vectorised exact draws at B_E = 8, 16, 32
    return checks, exact_h2


def _control(shards: dict, exact: dict, k: float) -> Check:
    """Not a check of the probe (it counts neither in the verdict nor in k): the same unbiasedness test
    applied to a known-biased estimator must reject it, or the test would have no power here."""
    control = unbiased_check(
        "control: x_estimator='seed' (token-mean) is biased",
        shards[CONTROL]["delta_h1"],
        exact["token-mean"],
        k,
    )
    control.passed = not control.passed  # "passed" = the bias was detected
    control.tolerance = f"|z| > {k:.2f}"
    return control


def _plots(out: Path, m: Measured, exact: dict, by_name: dict, s: Settings, lr: float) -> dict[str, Path]:
    """calibration.png, se_scaling.png and truth_vs_prediction.png in ``out``."""
    from .plots import calibration_plot, se_scaling_plot, truth_plot

    plots = {
        "calibration": out / "calibration.png",
        "se_scaling": out / "se_scaling.png",
        "truth_vs_prediction": out / "truth_vs_prediction.png",
    }
    calibration_plot(
        plots["calibration"], {w: m.shards[w] for w in WEIGHTINGS}, exact, by_name, s.shard_units
    )
    se_scaling_plot(
        plots["se_scaling"],
        list(s.scale_factors),
        s.scale_units,
        m.scaling,
        by_name["SE scaling: slope of log SE vs log c"],
    )
    truth_plot(plots["truth_vs_prediction"], m.truth_data, lr, s.truth_units)
    return plots


def print_table(report: dict, console: Console) -> None:
    table = Table(
        title=f"entropy-probe validate (seed {report['seed']}, {report['runtime_s']:.1f} s; "
        f"k = {report['tolerance']['k']:.2f} for a 1% family-wise level)"
    )
    table.add_column("check")
    table.add_column("measured")
    table.add_column("tolerance")
    table.add_column("result", justify="center")
    for c in report["checks"]:
        table.add_row(
            c["name"],
            c["measured"],
            c["tolerance"],
            "[bold green]PASS[/]" if c["passed"] else "[bold red]FAIL[/]",
        )
    table.add_section()
    for c in report.get("controls", []):  # informational: does not change the verdict
        table.add_row(
            c["name"],
            c["measured"],
            c["tolerance"],
            "[yellow]detected[/]" if c["passed"] else "[yellow]missed[/]",
        )
    console.print(table)
    full = report.get("problem", {}).get("full_step")
    if full:
        console.print(
            f"at the full step (alpha = 1): exact change / mean forecast = {full['truth_over_forecast']:.3f} "
            f"with the second order, {full['truth_over_delta_h1']:.3f} with the first order alone"
        )
    verdict = "[bold green]all checks passed[/]" if report["passed"] else "[bold red]some checks FAILED[/]"
    console.print(f"{verdict}; validation.json and plots in {Path(report['plots']['calibration']).parent}")


def main(argv: list[str] | None = None) -> int:
    """``entropy-probe validate [--out DIR] [--seed N] [--quick]``; returns 0 when every check passes."""
    parser = argparse.ArgumentParser(
        prog="entropy-probe validate",
        description="Check on a built-in, exactly enumerable policy that the probe's forecast is unbiased "
        "and "
        "its standard errors are calibrated (docs/design.md section 12). Writes validation.json and PNG "
        "plots; exits with status 1 when a check fails.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/validate"),
        help="folder for validation.json, calibration.png, se_scaling.png, truth_vs_prediction.png "
        "(default: runs/validate)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the policy and of every sample; each seed is a new problem (default: 0)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smaller experiments (K={QUICK.n_shards} shards of {QUICK.shard_units} units): "
        "about 15 s of CPU, same checks, wider tolerances",
    )
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
