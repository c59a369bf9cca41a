"""The entropy guard (DESIGN section 15): shrink one optimizer step so its forecast entropy drop,
taken at a one-sided confidence bound, stays inside a budget.

An Adam/AdamW step is linear in the learning rate (AdamW's decoupled decay ``lr * wd * theta``
and Adam's L2 term, which enters the gradient before the moments, included), so the step at
``c * eta`` is ``c`` times the step at ``eta`` and its forecast is ``c * delta_h1`` (first order) or
``c * delta_h1 + c^2 * delta_h2`` (second order). The guard picks the largest ``c`` in (0, 1] whose
``level`` lower confidence bound stays at or above ``-max_drop``, and scales every param group's lr
by ``c`` for that one step.

>>> import torch, entropy_probe as ep
>>> from entropy_probe.toy import TabularPolicy, sample_enumerated
>>> policy = TabularPolicy(seed=0)
>>> U, E = sample_enumerated(policy, n_units=8, seed=1), sample_enumerated(policy, n_units=8, seed=2)
>>> optimizer = torch.optim.AdamW(policy.parameters(), lr=0.5)
>>> result = ep.EntropyProbe(policy, optimizer, ep.ProbeConfig(direction="optimizer-step")).run(U, E)
>>> decision = ep.EntropyGuard(max_drop=1e-3).decide(result)
>>> decision.reason, round(decision.bound, 12)          # the bound sits on the budget when it binds
('scaled', -0.001)
>>> ep.policy_loss(policy, U, ep.ProbeConfig()).backward()
>>> with ep.EntropyGuard(max_drop=1e-3).applied(optimizer, decision):
...     optimizer.step()                                 # lr x decision.scale for this step only
>>> optimizer.param_groups[0]["lr"]
0.5

Which parts of the result are read (the contract with ``ProbeResult``):

- always ``result.first``: ``delta_h1``, ``se_cond_e`` (the SE over E with U fixed: the step is the one
  about to be taken, so the variance over U does not apply to it) and ``lr``;
- second order when ``result.second`` is not None. Its SE at scale ``c`` is, in
  order of preference: from the per-unit values (``per_unit`` = s_n and ``per_unit_q`` = the q_n of
  DESIGN section 12, unit n contributing ``eta^2/2 * q_n / B_E`` to ``delta_h2``) as
  ``sqrt(var_n(c eta s_n + c^2 eta^2/2 q_n) / B_E)``; else ``c * se_cond_e + c^2 * se_delta_h2``
  (an upper bound: the SE of a sum is at most the sum of the SEs); else ``c * se_cond_e`` (the
  noise of the second-order term ignored).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch

from .from_grad import optimizer_lr, unwrap_optimizer
from .inputs import is_number
from .result import PREFIX, ProbeResult

PER_UNIT_Q = "per_unit_q"  # the name of the q_n (result.second.per_unit_q), in error messages

# GuardDecision.reason: why the scale is what it is.
NO_STEP = "no-step"  # lr 0, or a forecast of exactly 0 with SE 0: nothing to guard, scale 1
RAISES = "raises-entropy"  # the lower bound of the full step is >= 0: scale 1
WITHIN = "within-budget"  # the lower bound of the full step is in [-max_drop, 0): scale 1
SCALED = "scaled"  # the full step's bound is below -max_drop: scale < 1, its bound equals -max_drop
REASONS = (NO_STEP, RAISES, WITHIN, SCALED)


# A step whose bound sits on the budget to float rounding (e.g. one already scaled by the guard and
# forecast again) is within budget, not "scaled" by 1 - 1e-16.
BUDGET_RTOL = 1e-12
LR_RTOL = 1e-9  # result.lr against the optimizer's: the same float, up to a round trip through a logger


@dataclass(frozen=True)
class GuardDecision:
    """What ``EntropyGuard.decide`` chose for one step."""

    scale: float
    """The learning-rate multiplier ``c`` in (0, 1] for this step."""
    reason: str
    """One of ``REASONS``: "no-step", "raises-entropy", "within-budget", "scaled"."""
    forecast: float
    """The forecast entropy change at ``c * eta`` (nats): ``c delta_h1 (+ c^2 delta_h2)``."""
    bound: float
    """Its ``level`` one-sided lower confidence bound, ``forecast - z_level * se`` (nats)."""
    se: float
    """The SE of ``forecast`` at ``c * eta`` (module docstring says which fields it comes from)."""
    order: int
    """1 (first-order forecast) or 2 (the result carried ``delta_h2``)."""
    lr: float | None = None
    """The learning rate the forecast was made at (``result.lr``); ``applied`` checks it against the
    optimizer's, so that a forecast of another step never scales this one (None: not checked)."""

    def to_dict(self) -> dict:
        """Flat numeric metrics for loggers (the reason is a string and stays out)."""
        return {f"{PREFIX}guard_{k}": getattr(self, k) for k in ("scale", "forecast", "bound", "se")}


@dataclass(frozen=True)
class Forecast:
    """The forecast at scale c, ``F(c) = c d1 + c^2 d2``, and its SE, ``SE(c)^2 = c^2 (a + b c + k c^2)``."""

    d1: float
    d2: float
    a: float
    b: float
    k: float
    order: int  # 2 when the result carried delta_h2
    lr: float | None = None  # the result's lr

    def at(self, c: float) -> tuple[float, float]:
        """(forecast, SE) at scale c."""
        return c * self.d1 + c * c * self.d2, c * math.sqrt(max(self.a + self.b * c + self.k * c * c, 0.0))

    @property
    def first_order(self) -> bool:
        return self.d2 == 0.0 and self.b == 0.0 and self.k == 0.0


class EntropyGuard:
    """Keeps each step's entropy drop within ``max_drop`` nats at confidence ``level`` (one-sided).

    max_drop: the budget, > 0 nats: the guarded step's entropy change should be >= -max_drop.
    level: in (0, 1); the forecast is taken at its one-sided ``level`` lower bound,
        ``forecast - z * se`` with ``z = Phi^-1(level)`` (1.645 at 0.95).
    """

    def __init__(self, max_drop: float, level: float = 0.95):
        if not (is_number(max_drop) and math.isfinite(max_drop) and max_drop > 0):
            raise ValueError(
                f"EntropyGuard: max_drop must be a finite number of nats > 0 (not a boolean), "
                f"got {max_drop!r}"
            )
        if not (is_number(level) and 0 < level < 1):
            raise ValueError(f"EntropyGuard: level must be in (0, 1), got {level!r}")
        self.max_drop, self.level = float(max_drop), float(level)
        self.z = NormalDist().inv_cdf(self.level)

    def decide(self, result) -> GuardDecision:
        """The largest scale ``c`` in (0, 1] whose forecast lower bound is >= ``-max_drop``."""
        fc = forecast_of(result)
        if float(_parts(result)[0].lr) == 0.0 or (fc.d1 == fc.d2 == 0.0 and fc.a == fc.b == fc.k == 0.0):
            return self._decision(fc, 1.0, NO_STEP)
        _, bound = self._bound(fc, 1.0)
        if bound >= 0:
            return self._decision(fc, 1.0, RAISES)
        if bound >= -self.max_drop * (1 + BUDGET_RTOL):  # on the budget up to rounding counts as within
            return self._decision(fc, 1.0, WITHIN)
        return self._decision(fc, self._solve(fc), SCALED)

    @contextlib.contextmanager
    def applied(self, optimizer, decision: GuardDecision) -> Iterator[None]:
        """Every param group's lr x ``decision.scale`` for the next ``optimizer.step()`` only.

        The lrs found at entry (whatever a scheduler set) come back right after that step (a post-step
        hook), so a ``scheduler.step()`` later inside the block sees them; or on exit when no step was
        taken or the step raised. Accelerate's ``AcceleratedOptimizer`` is unwrapped (``.optimizer``).
        """
        scale = float(decision.scale)
        if not (math.isfinite(scale) and 0 < scale <= 1):
            raise ValueError(f"EntropyGuard.applied: decision.scale must be in (0, 1], got {scale!r}")
        inner = unwrap_optimizer(optimizer)  # accelerate's AcceleratedOptimizer holds it in .optimizer
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                "EntropyGuard.applied: optimizer must be a torch.optim.Optimizer (or wrap one in "
                f".optimizer), got {type(inner).__name__}"
            )
        _check_lr(decision, inner)
        saved = [group["lr"] for group in inner.param_groups]
        restored = False

        def restore(*_):
            nonlocal restored
            if not restored:
                for group, lr in zip(inner.param_groups, saved):
                    group["lr"] = lr
                restored = True

        if scale != 1.0:
            for group, lr in zip(inner.param_groups, saved):
                group["lr"] = lr * scale
        handle = inner.register_step_post_hook(restore)
        try:
            yield
        finally:
            handle.remove()
            restore()

    # ---- helpers ------------------------------------------------------------------------------
    def _bound(self, fc: Forecast, c: float) -> tuple[float, float]:
        forecast, se = fc.at(c)
        return forecast, forecast - self.z * se

    def _decision(self, fc: Forecast, c: float, reason: str) -> GuardDecision:
        forecast, se = fc.at(c)
        return GuardDecision(c, reason, forecast, forecast - self.z * se, se, fc.order, fc.lr)

    def _solve(self, fc: Forecast) -> float:
        """The largest root in (0, 1) of ``g(c) = max_drop + bound(c)``, given g(0) > 0 > g(1)."""
        m, z = self.max_drop, self.z
        if fc.first_order:  # g(c) = m + c (d1 - z se): linear
            return m / -(fc.d1 - z * math.sqrt(fc.a))

        def g(c: float) -> float:
            return m + self._bound(fc, c)[1]

        # g's roots are roots of (m + d1 c + d2 c^2)^2 - z^2 c^2 (a + b c + k c^2), a quartic: they
        # split [0, 1] into pieces where g keeps its sign; the answer ends the last piece with g >= 0.
        quartic = [
            fc.d2**2 - z * z * fc.k,
            2 * fc.d1 * fc.d2 - z * z * fc.b,
            fc.d1**2 + 2 * m * fc.d2 - z * z * fc.a,
            2 * m * fc.d1,
            m * m,
        ]  # highest power first
        # every root's real part is an edge: a complex pair adds a harmless split, and a real root
        # (possibly double, found with a small imaginary part) is never missed
        roots = sorted(float(r.real) for r in np.roots(quartic) if 0 < r.real < 1)
        edges = [0.0, *roots, 1.0]
        mids = [(lo + hi) / 2 for lo, hi in itertools.pairwise(edges)]
        lo, hi = 0.0, 1.0
        for left, right in zip(mids[-2::-1], mids[::-1]):  # pairs of neighbouring pieces, right to left
            if g(left) >= 0 > g(right):
                lo, hi = left, right
                break
        return float(bisect(g, lo, hi))


def _check_lr(decision: GuardDecision, optimizer: torch.optim.Optimizer) -> None:
    """The decision was made for the step this optimizer is about to take: the same learning rate."""
    lr = getattr(decision, "lr", None)
    if lr is None:
        return
    own = optimizer_lr(optimizer)
    if not math.isclose(lr, own, rel_tol=LR_RTOL, abs_tol=0.0):
        raise ValueError(
            f"EntropyGuard.applied: the decision was made for a forecast at lr {lr!r} (result.lr) but the "
            f"optimizer's lr is {own!r}: the forecast is of another step (ProbeConfig.lr set by hand, or "
            "the scheduler moved the lr in between); probe the step the optimizer takes"
        )


def bisect(g, lo: float, hi: float, tol: float = 1e-13) -> float:
    """The sign change of g in [lo, hi] (g(lo) >= 0 > g(hi)), to ``tol``; returns the side with g >= 0."""
    for _ in range(200):
        if hi - lo <= tol:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if g(mid) >= 0 else (lo, mid)
    return lo


def forecast_of(result) -> Forecast:
    """Read ``result.first`` (``delta_h1``, ``se_cond_e``, ``lr``) and, when present, ``result.second``."""
    first, second = _parts(result)
    d1, se1, lr = (_finite(first, name) for name in ("delta_h1", "se_cond_e", "lr"))
    if se1 < 0 or lr < 0:
        raise ValueError(f"EntropyGuard: result.se_cond_e ({se1}) and result.lr ({lr}) must be >= 0")
    if second is None:
        return Forecast(d1, 0.0, se1 * se1, 0.0, 0.0, 1, lr)
    d2 = _finite(second, "delta_h2")
    q = getattr(second, PER_UNIT_Q, None)  # a stand-in may carry delta_h2 alone
    if q is not None:
        a, b, k = _per_unit_moments(first.per_unit, q, d1, d2, lr)
        return Forecast(d1, d2, a, b, k, 2, lr)
    se2 = 0.0 if getattr(second, "se_delta_h2", None) is None else _finite(second, "se_delta_h2")
    return Forecast(d1, d2, se1 * se1, 2 * se1 * se2, se2 * se2, 2, lr)  # SE(c) = c se1 + c^2 se2


def _parts(result) -> tuple:
    """(first, second) of a ``ProbeResult``; any other object with the flat names (a stand-in, a result
    built elsewhere) serves as both, its second part present when it carries ``delta_h2``."""
    if isinstance(result, ProbeResult):
        return result.first, result.second
    return result, (result if getattr(result, "delta_h2", None) is not None else None)


def _per_unit_moments(s, q, d1: float, d2: float, lr: float) -> tuple[float, float, float]:
    """``SE(c)^2 = c^2 (a + b c + k c^2)`` from ``var_n(c eta s_n + c^2 eta^2/2 q_n) / B_E``."""
    s = torch.as_tensor(s, dtype=torch.float64).reshape(-1)  # (B_E,)
    q = torch.as_tensor(q, dtype=torch.float64).reshape(-1)  # (B_E,)
    if s.shape != q.shape:
        raise ValueError(f"EntropyGuard: result.{PER_UNIT_Q} has {q.numel()} units, per_unit {s.numel()}")
    if not (torch.isfinite(s).all() and torch.isfinite(q).all()):
        raise ValueError(f"EntropyGuard: result.per_unit or result.{PER_UNIT_Q} is not finite")
    x, y = lr * s, lr * lr / 2 * q  # unit n's contributions to delta_h1 and delta_h2, times B_E
    for name, values, total in (("per_unit", x, d1), (PER_UNIT_Q, y, d2)):
        tiny = 1e-12 * float(values.abs().max())
        if not math.isclose(float(values.mean()), total, rel_tol=1e-6, abs_tol=tiny):
            raise ValueError(
                f"EntropyGuard: result.{name} does not average to the forecast it belongs to "
                f"({float(values.mean())} vs {total}): expected s_n with delta_h1 = lr mean(s) "
                f"and q_n with delta_h2 = lr^2/2 mean(q)"
            )
    n = s.numel()
    if n < 2:
        return 0.0, 0.0, 0.0  # as se_cond_e: SE 0 with fewer than 2 units
    xc, yc = x - x.mean(), y - y.mean()

    def cov(u: torch.Tensor, w: torch.Tensor) -> float:  # unbiased covariance, divided by B_E
        return float((u * w).sum()) / (n - 1) / n

    return cov(xc, xc), 2 * cov(xc, yc), cov(yc, yc)


def _finite(part, name: str) -> float:
    """The field ``name`` of a result part as a finite float, else a ValueError naming it."""
    value = getattr(part, name)
    if value is None or not math.isfinite(float(value)):
        raise ValueError(f"EntropyGuard: result.{name} must be a finite number, got {value!r}")
    return float(value)
