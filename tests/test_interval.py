"""``result.interval(level)``: the skew-aware interval covers at its level, checked over many independent
draws against the exact value (DESIGN section 14).

- Strongly skewed means (s = -Exp(1)^2: skewness -6.2) from B = 16 and 32 values: the normal interval
  covers 0.77 and 0.86 here, the hull of Student-t and bootstrap-t must cover >= 0.92 / 0.93.
- The toy policy, "sum" weighting at temperature 0.7 (the issue's case) at B_E = 16 and 32, and an
  easy case (token-mean, temperature 1), against the exact ``eta grad H . v`` by enumeration.
Each count is binomial: the assertion allows 2.33 binomial SEs (one-sided 1%) below the target.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy import stats

import entropy_probe as ep
from entropy_probe.statistics import Z95, student_t_quantile
from entropy_probe.toy import TabularPolicy, sample_enumerated
from entropy_probe.validation.calibration import coverage_floor_check, interval_coverage

K_ONE_SIDED = 2.33  # one-sided 1% normal quantile: the binomial tolerance of every coverage assertion


def _result(s: torch.Tensor, lr: float = 1.0) -> ep.ProbeResult:
    s = s.double()
    var = lr * lr * float(s.var()) / len(s)
    return ep.ProbeResult(
        delta_h1=lr * float(s.mean()),
        se_cond_e=math.sqrt(var),
        var_cond_e=var,
        se_jackknife=math.sqrt(var),
        se_total=None,
        entropy=0.0,
        n_eval_units=len(s),
        n_update_units=0,
        lr=lr,
        per_unit=s,
        eval_unit_ids=torch.arange(len(s)),
    )


@pytest.mark.parametrize("n,target", [(16, 0.92), (32, 0.93)])
def test_interval_covers_strongly_skewed_means(n, target):
    gen = torch.Generator().manual_seed(n)
    draws, mu = 400, -2.0  # E[-X^2] = -2 for X ~ Exp(1)
    covered = normal = 0
    for _ in range(draws):
        r = _result(-(torch.empty(n, dtype=torch.float64).exponential_(generator=gen) ** 2))
        lo, hi = r.interval(0.95)
        covered += lo <= mu <= hi
        lo, hi = r.interval(z=Z95)
        normal += lo <= mu <= hi
    floor = target - K_ONE_SIDED * math.sqrt(target * (1 - target) / draws)  # binomial tolerance
    print(f"B={n}: skew-aware {covered / draws:.3f}, normal {normal / draws:.3f}, floor {floor:.3f}")
    assert covered / draws >= floor
    assert normal / draws < floor  # the case has teeth: the plain normal interval fails it


@pytest.mark.parametrize(
    "weighting,temperature,eval_units,target",
    [("sum", 0.7, 16, 0.92), ("sum", 0.7, 32, 0.93), ("token-mean", 1.0, 32, 0.93)],
)
def test_interval_covers_the_exact_change_on_the_toy_policy(weighting, temperature, eval_units, target):
    covered, n = interval_coverage(weighting, temperature, eval_units, n_draws=200, seed=0)
    check = coverage_floor_check("toy", covered, n, target, K_ONE_SIDED)  # floor: target - 2.33 binomial SEs
    print(check.measured, check.tolerance)
    assert check.passed, (check.measured, check.tolerance)


def test_student_t_quantile_matches_scipy():
    for df in (4, 7, 15, 31, 200):
        for p in (0.9, 0.975, 0.995):
            # Cornish-Fisher to 1/df^4 (the docstring's claim): 1e-3 relative at df >= 4 up to p = 0.975,
            # 3e-3 in the far tail
            tol = 1e-3 if p <= 0.975 else 3e-3
            assert student_t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=tol)


def test_interval_api_levels_z_and_dict():
    policy = TabularPolicy(seed=0)
    probe = ep.EntropyProbe(policy, config=ep.ProbeConfig(entropy="sequence", lr=1e-2, direction="sgd"))
    r = probe.run(sample_enumerated(policy, 6, seed=1), sample_enumerated(policy, 12, seed=2))
    lo90, hi90 = r.interval(0.90)
    lo95, hi95 = r.interval()
    assert lo95 < lo90 < r.delta_h1 < hi90 < hi95  # nested, around the estimate
    assert r.interval() == r.interval()  # deterministic (a private generator): the same bits twice
    assert r.interval(z=1.5) == (r.delta_h1 - 1.5 * r.se_cond_e, r.delta_h1 + 1.5 * r.se_cond_e)
    with pytest.raises(ValueError, match="level"):
        r.interval(1.96)  # a z passed positionally: an error naming the argument, never a silent interval
    d = json.loads(json.dumps(r.to_dict()))
    assert r.interval_method == "hull(student-t, bootstrap-t)"  # on the result; the metrics are numbers only
    assert "entropy_probe/interval_method" not in d
    assert all(isinstance(x, (int, float, bool)) for x in d.values()), d
    assert (d["entropy_probe/interval_lo95"], d["entropy_probe/interval_hi95"]) == (lo95, hi95)
