"""The statistics behind the tolerances of ``entropy-probe validate`` (no scipy needed).

Every statistical check of the harness is a two-sided test whose tolerance is a quantile, never a
hand-picked margin. The harness runs M such tests; to keep the chance that a correct probe fails
*any* of them at ``FAMILY_LEVEL`` (1%), each test runs at level ``FAMILY_LEVEL / M`` (Bonferroni),
i.e. with the normal quantile ``k = z(1 - FAMILY_LEVEL / (2 M))``. With M = 11 tests, k = 3.32.

Quantiles come from the standard library (``statistics.NormalDist``) and, for the chi-square, the
Wilson-Hilferty cube-root approximation, whose relative error at |z| <= 3.3 is below 4e-3 for the >= 50 degrees
of freedom used here.

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


def excess_kurtosis(values) -> float:
    """Sample excess kurtosis ``m4 / m2^2 - 3`` (0 for a normal distribution)."""
    x = [float(v) for v in values]
    n = len(x)
    mean = sum(x) / n
    m2 = sum((v - mean) ** 2 for v in x) / n
    m4 = sum((v - mean) ** 4 for v in x) / n
    return m4 / (m2 * m2) - 3.0 if m2 > 0 else 0.0


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
