"""``entropy-probe validate``: its statistics have the stated level and power; the command works end to end.

Run: ``PYTHONPATH=src python -m pytest -q tests/test_validate.py``.

The pure check functions are fed synthetic shards whose truth is known: calibrated inputs must pass,
and inputs with the defect each check exists to catch (an SE off by a factor, a biased mean, an SE
that does not shrink with B_E) must fail. Synthetic data are seeded; each passing case sits well
inside its interval for that seed, and each failing case is many standard errors outside.
"""

from __future__ import annotations

import json
import math

import matplotlib.image as mpimg
import pytest
import torch
from scipy import stats

from entropy_probe.validation import checks, run
from entropy_probe.validation import problem as vproblem
from entropy_probe.validation.stats import (
    chi2_quantile,
    excess_kurtosis,
    fit_slope,
    skewness,
    studentized_coverage,
    tolerance_k,
    wilson_interval,
)

K = tolerance_k(32)  # the harness's own k (32 statistical tests, 10 token-level, at a 1% family-wise level)


def _shards(n_shards: int, units: int, seed: int, skewed: bool = False):
    """Synthetic s_n (exponential = skewed and heavy-tailed, or normal) -> per-shard (delta_h1, var, se)."""
    gen = torch.Generator().manual_seed(seed)
    s = (
        torch.empty(n_shards, units, dtype=torch.float64).exponential_(generator=gen) - 1.0
        if skewed
        else torch.randn(n_shards, units, dtype=torch.float64, generator=gen)
    )  # (K, B_E), mean 0, var 1
    mean = s.mean(dim=1)
    var = s.var(dim=1) / units  # the probe's Var_E with lr = 1
    return mean.tolist(), var.tolist(), var.sqrt().tolist(), s.reshape(-1).tolist()


# ---- the statistics helpers against scipy -----------------------------------------------------------
def test_quantiles_match_scipy():
    assert math.isclose(tolerance_k(13), stats.norm.ppf(1 - 0.01 / 26), rel_tol=1e-9)
    for df in (50, 99, 299):
        for z in (-3.36, -1.96, 1.96, 3.36):
            # Wilson-Hilferty: relative error below 4e-3 at df >= 50 (module docstring).
            assert math.isclose(chi2_quantile(df, z), stats.chi2.ppf(stats.norm.cdf(z), df), rel_tol=4e-3)
    lo, hi = wilson_interval(87, 100, 3.0)
    ref = stats.binomtest(87, 100).proportion_ci(
        confidence_level=2 * stats.norm.cdf(3.0) - 1, method="wilson"
    )
    assert math.isclose(lo, ref.low, rel_tol=1e-9) and math.isclose(hi, ref.high, rel_tol=1e-9)
    x = stats.expon.rvs(size=20000, random_state=1)
    assert math.isclose(excess_kurtosis(x.tolist()), stats.kurtosis(x), rel_tol=1e-9)


def test_slope_fit_recovers_a_known_line():
    fit = fit_slope([0.0, 1.0, 2.0, 3.0], [1.0, 0.5, 0.0, -0.5], [0.1] * 4)
    assert math.isclose(fit.slope, -0.5) and math.isclose(fit.intercept, 1.0)
    assert math.isclose(fit.se_slope, 0.1 / math.sqrt(5.0))  # se / sqrt(Sxx), Sxx = 5


# ---- each check passes calibrated data and fails the defect it is for --------------------------------
@pytest.mark.parametrize("skewed", [False, True])
def test_variance_check_passes_calibrated_shards_and_fails_a_wrong_se(skewed):
    d, var, _, s = _shards(300, 32, seed=1, skewed=skewed)
    kurt = excess_kurtosis(s)
    ok = checks.variance_check("v", d, var, kurt, 32, K)
    assert ok.passed, ok
    for factor in (0.5, 2.0):  # an SE off by sqrt(2) either way: the ratio is 2 or 1/2
        bad = checks.variance_check("v", d, [factor * v for v in var], kurt, 32, K)
        assert not bad.passed, bad


@pytest.mark.parametrize("skewed", [False, True])
def test_coverage_check_passes_calibrated_intervals_and_fails_narrow_ones(skewed):
    d, _, se, s = _shards(300, 32, seed=2, skewed=skewed)
    moments = (skewness(s), excess_kurtosis(s))
    ok = checks.coverage_check("c", d, se, 0.0, 32, *moments, K)
    assert ok.passed, ok
    assert not checks.coverage_check(
        "c", d, [0.7 * x for x in se], 0.0, 32, *moments, K
    ).passed  # covers ~83%
    biased = checks.coverage_check("c", d, se, 1.5 * math.sqrt(1 / 32), 32, *moments, K)  # centre off 1.5 SE
    assert not biased.passed, biased


@pytest.mark.parametrize("law", ["normal", "exponential", "gamma(4)"])
@pytest.mark.parametrize("n", [16, 32])
def test_studentized_coverage_matches_simulation(law, n):
    gen = torch.Generator().manual_seed(n)
    shape = (100_000, n)
    if law == "normal":
        x, mean, skew, kurt = torch.randn(shape, dtype=torch.float64, generator=gen), 0.0, 0.0, 0.0
    elif law == "exponential":
        x, mean, skew, kurt = (
            torch.empty(shape, dtype=torch.float64).exponential_(generator=gen),
            1.0,
            2.0,
            6.0,
        )
    else:  # a sum of 4 exponentials
        x = torch.empty(shape + (4,), dtype=torch.float64).exponential_(generator=gen).sum(-1)
        mean, skew, kurt = 4.0, 1.0, 1.5
    t = (x.mean(dim=1) - mean) / (x.var(dim=1) / n).sqrt()  # (100000,) studentized means
    simulated = float((t.abs() <= 1.959963984540054).double().mean())
    # Binomial SE of the simulation is 8e-4; the O(1/n^2) error of the expansion is below 0.02 at n = 16
    # for the exponential (skewness 2, the worst case here) and below 0.007 at n = 32.
    tol = 4 * 8e-4 + (0.02 if n == 16 else 0.007)
    assert abs(studentized_coverage(1.959963984540054, n, skew, kurt) - simulated) <= tol
    assert (
        abs(studentized_coverage(1.959963984540054, n, skew, kurt) - 0.95) > 0.003
    )  # the correction is real


def test_unbiased_check_detects_a_bias_of_a_few_percent_of_the_spread():
    d, _, _, _ = _shards(300, 32, seed=3)
    se_of_mean = math.sqrt(1 / 32 / 300)
    assert checks.unbiased_check("u", d, 0.0, K).passed
    assert not checks.unbiased_check("u", d, 6 * se_of_mean, K).passed


def test_slope_check_accepts_one_over_sqrt_c_and_rejects_an_se_that_does_not_shrink():
    factors = [1, 2, 4, 8]
    good = [_shards(24, 16 * c, seed=10 + c)[1] for c in factors]  # Var_E of shards of 16 c units
    fit = checks.slope_check("s", factors, good, K)
    assert fit.passed, fit
    flat = [_shards(24, 16, seed=20 + c)[1] for c in factors]  # the SE of 16 units whatever c
    assert not checks.slope_check("s", factors, flat, K).passed


# ---- the command ------------------------------------------------------------------------------------
def test_same_seed_same_numbers():
    tiny = vproblem.Settings(n_shards=3, shard_units=4, scale_units=4, scale_replicates=2, truth_units=8)
    runs = []
    for _ in range(2):
        prob = vproblem.build_problem(7, tiny)
        runs.append((prob.lr, checks.run_shards(prob, tiny, 7, lambda: None)))
    assert runs[0] == runs[1]
    other = checks.run_shards(vproblem.build_problem(8, tiny), tiny, 8, lambda: None)
    assert other != runs[0][1]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        run.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--seed", "--quick"):
        assert option in out


def test_exit_status_is_1_when_a_check_fails(monkeypatch, tmp_path, capsys):
    report = dict(
        passed=False,
        seed=0,
        runtime_s=0.0,
        tolerance=dict(k=3.0),
        checks=[dict(name="a check", measured="x", tolerance="y", passed=False)],
        plots=dict(calibration=str(tmp_path / "calibration.png")),
    )
    monkeypatch.setattr(run, "run_validation", lambda *args, **kwargs: report)
    assert run.main(["--out", str(tmp_path)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_quick_run_end_to_end(tmp_path, capsys):
    assert run.main(["--quick", "--out", str(tmp_path), "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "PASS" in out
    report = json.loads((tmp_path / "validation.json").read_text())
    names = [c["name"] for c in report["checks"]]
    for expected in (
        "variance ratio (token-mean)",
        "variance ratio (sum)",
        "coverage (token-mean)",
        "coverage (sum)",
        "SE scaling: slope of log SE vs log c",
        "zero advantages: v, dH1, SEs, truth",
        "unbiased vs exact (token-mean)",
        "unbiased vs exact (sum)",
        "truth (exact): change / tangent -> 1",
        "truth (importance weights) vs exact change, every alpha",
        "truth - alpha dH1 on the same E: order 2",
        "delta_h2 unbiased vs exact (token-mean)",
        "delta_h2 unbiased vs exact (sum)",
        "order: |truth - forecast| vs alpha (log-log)",
        "by_group sums to delta_h1",
        "token: unbiased vs exact (run(), shards)",
        "token: ratio bias below 0.2 SE (B_E=8)",
        "token: variance vs sampled-token (B_E=8)",
        "token: coverage (B_E=32)",
    ):
        assert expected in names
    assert report["passed"] and all(c["passed"] for c in report["checks"])
    assert report["settings"]["n_shards"] >= 100
    assert report["tolerance"]["statistical_tests"] == 32 and math.isclose(report["tolerance"]["k"], K)
    for expected in (
        "se_total (sgd, fresh)",
        "se_total (adam-preconditioned, fresh)",
        "se_total (adam-preconditioned, warm)",
        "se_total (optimizer-step, warm)",
        "interval coverage (sum, T=0.7, B_E=16)",
        "interval coverage (sum, T=0.7, B_E=32)",
        "interval coverage (token-mean, T=1, B_E=32)",
    ):
        assert expected in names
    (control,) = report["controls"]  # the note's estimator is biased here, and the test sees it
    assert control["passed"] and abs(control["figures"]["z"]) > K
    zero = next(c for c in report["checks"] if c["name"].startswith("zero"))["figures"]
    assert all(value == 0.0 for case in zero.values() for value in case.values())
    for name in ("calibration", "se_scaling", "truth_vs_prediction"):
        path = tmp_path / f"{name}.png"
        assert path.stat().st_size > 30_000  # a real figure, not an empty canvas
        img = mpimg.imread(path)  # (H, W, 4) floats in [0, 1]
        assert img.shape[0] >= 500 and img.shape[1] >= 700
        rgb = img[..., :3]
        assert float(rgb.std()) > 0.05 and float((rgb < 0.5).mean()) > 0.01  # ink: lines, text, markers
