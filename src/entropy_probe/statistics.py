"""Statistics of the per-unit projections s_n = v . X_n (DESIGN section 5).

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


def sample_variance(m: Moments, what: str = "s") -> float:
    """Unbiased sample variance; 0 with a warning when fewer than 2 values."""
    n = float(m.count)
    if n < 2:
        warnings.warn(f"fewer than 2 units ({int(n)}) for the variance of {what}: its SE is reported as 0",
                      RuntimeWarning, stacklevel=3)
        return 0.0
    return max(float(m.m2) / (n - 1), 0.0)


def conditional_variance(m: Moments, lr: float) -> tuple[float, float]:
    """``(Var_E(dH1 | U), SE_E(dH1 | U)) = (eta^2 var(s) / B_E, eta sqrt(var(s) / B_E))``."""
    n = float(m.count)
    var_s = sample_variance(m, "s over evaluation units")
    var = lr * lr * var_s / n if n > 0 else 0.0
    return var, math.sqrt(var)


def jackknife_se(s: Tensor, lr: float) -> float:
    """Delete-one jackknife SE of ``eta * mean(s)`` over the units, computed from the leave-one-out means.

    For a mean it equals the closed form ``eta sqrt(var(s)/B)``; the probe reports it as the note's
    cross-check, and the truth reuses ``jackknife_se_of`` for ratio estimators, where it is not exact.
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


def update_variance_term(t: Tensor, lr: float) -> float:
    """The note's V_Y term ``eta^2 var(t) / B_U`` with ``t_m = Xbar_E . Y_m``."""
    m = moments_update(t)
    n = float(m.count)
    if n == 0:
        return 0.0
    return lr * lr * sample_variance(m, "t over update units") / n
