"""The statistics behind the tolerances of ``entropy-probe validate`` (no scipy needed).

Every statistical check of the harness is a two-sided test whose tolerance is a quantile, never a
hand-picked margin. The harness runs M such tests; to keep the chance that a correct probe fails
*any* of them at ``FAMILY_LEVEL`` (1%), each test runs at level ``FAMILY_LEVEL / M`` (Bonferroni),
i.e. with the normal quantile ``k = z(1 - FAMILY_LEVEL / (2 M))``. With M = 15 tests, k = 3.40.

Quantiles come from the standard library (``statistics.NormalDist``) and, for the chi-square, the
Wilson-Hilferty cube-root approximation, whose relative error at |z| <= 3.4 is below 4e-3 for the
>= 50 degrees of freedom used here (checked against scipy in the tests).

>>> round(tolerance_k(1, 0.05), 3)
1.96
>>> lo, hi = chi2_ratio_interval(199, 1.96)      # 95% interval of s^2 / sigma^2 with K = 200
>>> round(lo, 3), round(hi, 3)
(0.813, 1.206)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

FAMILY_LEVEL = 0.01


def tolerance_k(n_tests: int, family_level: float = FAMILY_LEVEL) -> float:
    """Two-sided normal quantile of one test among ``n_tests`` at a family-wise level (Bonferroni)."""
    return NormalDist().inv_cdf(1.0 - family_level / (2.0 * n_tests))


def chi2_quantile(df: float, z: float) -> float:
    """Wilson-Hilferty: the chi-square(df) quantile at the probability where N(0,1) has quantile z."""
    c = 2.0 / (9.0 * df)
    return df * max(1.0 - c + z * math.sqrt(c), 0.0) ** 3


def chi2_ratio_interval(df: float, k: float) -> tuple[float, float]:
    """Interval of ``sample variance / true variance`` (~ chi2(df) / df) at the two-sided level of k."""
    return chi2_quantile(df, -k) / df, chi2_quantile(df, k) / df


def _central_moments(values) -> tuple[float, float, float]:
    x = [float(v) for v in values]
    n = len(x)
    mean = sum(x) / n
    return tuple(sum((v - mean) ** p for v in x) / n for p in (2, 3, 4))


def excess_kurtosis(values) -> float:
    """Sample excess kurtosis ``m4 / m2^2 - 3`` (0 for a normal distribution)."""
    m2, _, m4 = _central_moments(values)
    return m4 / (m2 * m2) - 3.0 if m2 > 0 else 0.0


def skewness(values) -> float:
    """Sample skewness ``m3 / m2^1.5`` (0 for a symmetric distribution)."""
    m2, m3, _ = _central_moments(values)
    return m3 / m2**1.5 if m2 > 0 else 0.0


def studentized_coverage(z: float, n: int, skew: float, kurt: float) -> float:
    """Coverage of ``mean -+ z * sd / sqrt(n)`` (sd with divisor n - 1) for n iid values, to O(1/n).

    The interval is nominally 2 Phi(z) - 1, but its SE is estimated from the same n values. The
    Edgeworth expansion of the studentized mean (Hall 1992, "The Bootstrap and Edgeworth Expansion",
    section 2.6) gives P(|T| <= z) = 2 Phi(z) - 1 + (2/n) q2(z) phi(z) for the divisor-n SD, with
    q2(z) = z [kurt (z^2 - 3)/12 - skew^2 (z^4 + 2 z^2 - 3)/18 - (z^2 + 3)/4]; the divisor n - 1
    widens the interval by 1 + 1/(2n), adding z phi(z) / n. Checked by simulation in the tests
    (normal: 0.941 at n = 32, the t(31) value; exponential: 0.913 against 0.920 simulated).
    """
    phi = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    q2 = z * (kurt * (z * z - 3) / 12 - skew * skew * (z**4 + 2 * z * z - 3) / 18 - (z * z + 3) / 4)
    return 2 * NormalDist().cdf(z) - 1 + (2.0 / n) * phi * (q2 + z / 2)


def wilson_interval(successes: int, trials: int, k: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion; p0 lies inside iff the score test accepts p0."""
    p = successes / trials
    denom = 1.0 + k * k / trials
    centre = (p + k * k / (2 * trials)) / denom
    half = k * math.sqrt(p * (1 - p) / trials + k * k / (4 * trials * trials)) / denom
    return centre - half, centre + half


@dataclass
class SlopeFit:
    """Least-squares line ``y = intercept + slope * x`` with the slope's SE from per-point SEs."""

    slope: float
    intercept: float
    se_slope: float


def fit_slope(x: list[float], y: list[float], se_y: list[float]) -> SlopeFit:
    """Ordinary least squares; ``Var(slope) = sum (x_i - xbar)^2 se_i^2 / Sxx^2`` (independent points)."""
    n = len(x)
    xbar, ybar = sum(x) / n, sum(y) / n
    sxx = sum((xi - xbar) ** 2 for xi in x)
    slope = sum((xi - xbar) * (yi - ybar) for xi, yi in zip(x, y)) / sxx
    var = sum((xi - xbar) ** 2 * s * s for xi, s in zip(x, se_y)) / (sxx * sxx)
    return SlopeFit(slope=slope, intercept=ybar - slope * xbar, se_slope=math.sqrt(var))
