"""Statistics of the per-unit projections s_n = v . X_n (docs/design.md section 5).

torchmetrics-style: ``moments_update`` turns a chunk of values into running moments
``(count, mean, M2)`` in float64, ``moments_merge`` combines two (Chan et al.), and the ``*_compute``
functions turn moments into results. Chan's merge never forms ``S2 - B * mean^2``, so a common
offset of 1e6 in the s_n costs no precision (the founding note's float32 formula loses it all).

>>> import torch
>>> s = torch.tensor([1.0, 2.0, 4.0])
>>> m = moments_merge(moments_update(s[:1]), moments_update(s[1:]))
>>> var, se = conditional_variance(m, lr=0.5)
>>> round(var, 12) == round(0.25 * float(s.double().var()) / 3, 12)
True
>>> abs(jackknife_se(s, lr=0.5) - se) < 1e-12
True
>>> lo, hi = bootstrap_t_interval(s, lr=0.5, level=0.95)
>>> lo < 0.5 * float(s.mean()) < hi
True
"""

from __future__ import annotations

import math
import warnings
from statistics import NormalDist
from typing import NamedTuple

import torch
from torch import Tensor

Z95 = NormalDist().inv_cdf(0.975)  # 1.95996...: the two-sided 95% normal quantile


class Moments(NamedTuple):
    """Running moments of a stream of scalars, float64 scalars tensors."""

    count: Tensor
    mean: Tensor
    m2: Tensor  # sum of squared deviations from the mean


def moments_update(values: Tensor) -> Moments:
    """Moments of one chunk (two-pass within the chunk: exact for any offset)."""
    x = values.detach().double().reshape(-1)
    n = torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)
    if x.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        return Moments(n, zero, zero.clone())
    mean = x.mean()
    return Moments(n, mean, ((x - mean) ** 2).sum())


def moments_merge(a: Moments, b: Moments) -> Moments:
    """Chan's parallel merge of two sets of moments."""
    n = a.count + b.count
    if float(n) == 0:
        return a
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n)
    return Moments(n, mean, m2)


def sample_variance(m: Moments, what: str) -> float:
    """Unbiased sample variance of ``what``; 0 with a warning when fewer than 2 values."""
    n = float(m.count)
    if n < 2:
        warnings.warn(
            f"fewer than 2 units ({int(n)}) for the variance of {what}: its SE is reported as 0",
            RuntimeWarning,
            stacklevel=3,
        )
        return 0.0
    return max(float(m.m2) / (n - 1), 0.0)


def conditional_variance(m: Moments, lr: float) -> tuple[float, float]:
    """``(Var_E(dH1 | U), SE_E(dH1 | U)) = (eta^2 var(s) / B_E, eta sqrt(var(s) / B_E))``."""
    var_s = sample_variance(m, "s over evaluation units")  # 0 with fewer than 2 units, also with none
    var = lr * lr * var_s / float(m.count) if var_s else 0.0
    return var, math.sqrt(var)


def jackknife_se(s: Tensor, lr: float) -> float:
    """Delete-one jackknife SE of ``eta * mean(s)`` over the units, computed from the leave-one-out means.

    For a mean it equals the closed form ``eta sqrt(var(s)/B)`` algebraically. The probe keeps it as
    ``se_jackknife`` (docs/design.md section 5) because it is computed by another route, from the gathered s_n
    rather than the float64 moments merged across ranks, so a disagreement flags a bad merge; it is
    no independent error estimate. The truth uses it for its per-unit changes.
    """
    x = s.detach().double().reshape(-1)
    b = x.numel()
    if b < 2:
        return 0.0
    loo = lr * (x.sum() - x) / (b - 1)  # Z_(-n)
    return jackknife_se_of(loo)


def jackknife_se_of(leave_one_out: Tensor) -> float:
    """SE from delete-one estimates: ``sqrt((B-1)/B * sum (Z_(-n) - mean Z)^2)``."""
    z = leave_one_out.double()
    b = z.numel()
    if b < 2:
        return 0.0
    return math.sqrt(float((b - 1) / b * ((z - z.mean()) ** 2).sum()))


BOOTSTRAP_RESAMPLES = 4000  # bootstrap-t replicates; the quantiles' Monte-Carlo error is then << their spread
BOOTSTRAP_SEED = 0  # a private generator: the interval is a deterministic function of the s_n


def bootstrap_t_interval(
    s: Tensor, lr: float, level: float, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[float, float]:
    """Bootstrap-t (studentized bootstrap) interval for ``eta * E[s]`` from the per-unit s_n.

    ``T* = (mean* - mean) / se*`` over resamples of the units with replacement; the interval is
    ``eta * (mean - q_hi se, mean - q_lo se)`` with ``q`` the quantiles of ``T*``. It is second-order
    accurate: it corrects the normal interval for the skewness of s_n (long left tail of "sum" weighting
    at low temperature: normal coverage 0.87 at B_E = 32, docs/validation.md). Resamples whose se* is 0
    (every draw the same unit) carry no t and are dropped. Seeded privately: the global RNG is untouched.
    """
    x = s.detach().double().reshape(-1).cpu()
    b = x.numel()
    mean = float(x.mean()) if b else 0.0
    se = float(x.std() / math.sqrt(b)) if b >= 2 else 0.0
    if se == 0.0:
        return lr * mean, lr * mean
    gen = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    t = []
    for start in range(0, resamples, 256):  # chunks keep the (K, B) index matrix small at large B_E
        idx = torch.randint(b, (min(256, resamples - start), b), generator=gen)  # (K, B)
        xs = x[idx]
        se_star = xs.std(dim=1) / math.sqrt(b)
        keep = se_star > 0
        t.append((xs.mean(dim=1)[keep] - mean) / se_star[keep])
    t = torch.cat(t)
    probs = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    q_lo, q_hi = torch.quantile(t, probs).tolist()
    return lr * (mean - q_hi * se), lr * (mean - q_lo * se)


def skew_aware_interval(s: Tensor, lr: float, level: float) -> tuple[float, float]:
    """The hull of the Student-t interval (df = B_E - 1) and the bootstrap-t interval for ``eta * E[s]``.

    Each alone fails somewhere: the t interval on strongly skewed s_n (0.77 at B_E = 16 on a squared
    exponential), the bootstrap-t on the toy policy's heavy-tailed discrete s_n (0.885 against the
    normal's 0.935 at B_E = 16: a sample that misses the rare large s_n teaches the bootstrap nothing
    about them). The hull covers whenever either does (docs/validation.md has the measured coverages).
    """
    x = s.detach().double().reshape(-1).cpu()
    b = x.numel()
    if b < 2:
        return bootstrap_t_interval(x, lr, level)  # a point: the SE is 0 with fewer than 2 units
    half = student_t_quantile((1 + level) / 2, b - 1) * lr * float(x.std()) / math.sqrt(b)
    lo, hi = bootstrap_t_interval(x, lr, level)
    center = lr * float(x.mean())
    return min(lo, center - half), max(hi, center + half)


def student_t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t by its Cornish-Fisher expansion in 1/df (Abramowitz-Stegun 26.7.5): relative
    error < 1e-3 for df >= 4 and p <= 0.975 (t_0.975: 2.776 at df 4, 2.131 at df 15), < 3e-3 at p = 0.995,
    slightly low below df 4; torch has no t icdf."""
    z = NormalDist().inv_cdf(p)
    terms = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(c / df ** (k + 1) for k, c in enumerate(terms))
