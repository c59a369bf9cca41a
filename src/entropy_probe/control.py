"""Entropy control to a target (docs/design.md section 19): keep the entropy after each step inside a band.

``EntropyController(target, band, mode, level)`` reads ``result.prediction`` (docs/design.md section 17) and
the entropy now (``result.entropy``, or one the caller passes) and decides, per step:

- ``mode="scale"``: every param group's lr x ``c``, c in (0, 1] (as the guard: an Adam/AdamW step is
  linear in the lr), the largest ``c`` whose predicted entropy after the step, with the prediction's
  ``level`` interval around it, stays inside ``[target - band, target + band]``, whichever way the step
  moves entropy. The interval at scale c: ``c x result.interval(level)`` (first order, exact: the
  change is linear in c), ``forecast(c) -+ z se(c)`` (second order, ``guard.forecast_of``), or the
  lookahead evaluated at trial scales (one forward each). When the entropy is outside the band already
  a step is kept (cut only where its interval would overshoot the far edge) unless its whole interval
  moves away from the band: then it is cut to ``min_scale`` (a step whose direction is noise is not
  stopped).
- ``mode="steer"``: before ``optimizer.step()``, ``.grad -= lambda Xbar_A``: an entropy bonus along the
  entropy gradient estimated on half A of E, with lambda solved so that the first-order prediction made
  on the other half, ``eta Xbar_B . v(g - lambda Xbar_A)`` through the optimizer's exact direction map
  (``steer``), puts the entropy on the band (``aim="band"``: the nearest point of the band, lambda 0
  when the unmodified step lands inside) or on the target (``aim="target"``). The halves are independent
  given theta, so the prediction is not biased by the bonus being fitted to its own noise.

``applied(optimizer, decision)`` applies a decision to exactly one ``optimizer.step()`` (lrs, ``.grad``)
and restores both right after it (a post-step hook), or on exit when no step was taken or it raised.

Memory (steer): the probe keeps ``Xbar_A`` and ``Xbar_B`` (``ProbeConfig(keep_halves=True)``: two fp32
copies of the trainable parameters, formed by the E pass that the forecast runs anyway); the decision
keeps ``Xbar_A`` alone (drop the result to free ``Xbar_B``); ``applied`` holds one copy of the modified
``.grad`` to restore it bit-exactly; the solve builds one direction at a time (two more transient copies).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from statistics import NormalDist

import torch

from .from_grad import check_step_lr, unwrap_optimizer
from .guard import forecast_of
from .result import PREFIX
from .steer import CAPPED, NO_DIRECTION, STEERED, steer

MODES = ("scale", "steer")
AIMS = ("band", "target")

# ControlDecision.reason
NO_STEP = "no-step"  # lr 0 or a prediction of exactly 0 with SE 0
WITHIN = "within-band"  # the unmodified step's interval lands inside the band: scale 1 / lambda 0
SCALED = "scaled"  # scale < 1: the interval's edge sits on the band's edge
TOWARD = "toward-band"  # the entropy is outside the band and the step is not surely moving away from it
AWAY = "away-from-band"  # outside the band, and the step's whole interval moves away: min_scale
UNTRUSTED = "untrusted-step"  # nothing predicts the full step: cut to where the Taylor forecast holds
REASONS = (
    NO_STEP,
    WITHIN,
    SCALED,
    TOWARD,
    AWAY,
    UNTRUSTED,
    STEERED,
    CAPPED,
    NO_DIRECTION,
)  # steer's: steer.py
TRIALS, REFINE = 10, 6  # the lookahead's trial scales: halvings, then bisections (one forward each)


@dataclass(frozen=True)
class ControlDecision:
    """What ``EntropyController.decide`` chose for one step."""

    mode: str
    scale: float
    """lr multiplier in (0, 1] ("scale"; 1 under "steer")"""
    coefficient: float
    """lambda: ``.grad -= lambda Xbar_A`` before the step ("steer"; 0 under "scale")"""
    reason: str
    target: float
    """nats, the target at this step"""
    entropy: float
    """nats, the entropy before the step the decision started from"""
    predicted: float
    """nats, the predicted entropy after the controlled step"""
    interval: tuple[float, float]
    """its ``level`` interval (nats)"""
    lr: float | None = None
    """the lr the forecast was made at; ``applied`` checks it against the optimizer's"""
    bonus: list | None = field(default=None, repr=False, compare=False)
    """steer: ``[(parameter, Xbar_A of it)]``, the direction added to ``.grad``"""

    def to_dict(self) -> dict:
        """Flat numeric metrics for loggers (mode and reason are strings and stay out)."""
        keys = ("scale", "coefficient", "target", "entropy", "predicted")
        out = {f"{PREFIX}control/{k}": float(getattr(self, k)) for k in keys}
        out[f"{PREFIX}control/lo"], out[f"{PREFIX}control/hi"] = self.interval
        return out


class EntropyController:
    """Holds the entropy after each step inside ``[target - band, target + band]`` (module docstring).

    target: nats, or a schedule ``f(step) -> nats``. band: > 0 nats, both sides. mode: "scale" or
    "steer". level: the prediction interval's coverage, in (0, 1). min_scale: the scale of a step that
    moves the entropy away from a band it is already outside. max_bonus: the largest |lambda| as a
    multiple of ``|g| / |Xbar_A|`` (steer). aim: "band" or "target" (steer).
    """

    def __init__(
        self,
        target: float | Callable[[int], float],
        band: float = 0.1,
        mode: str = "scale",
        level: float = 0.95,
        min_scale: float = 1e-3,
        max_bonus: float = 10.0,
        aim: str = "band",
    ):
        if not callable(target):
            _need(
                _finite_number(target),
                "target",
                f"must be a finite number of nats or f(step), got {target!r}",
            )
        _need(_finite_number(band) and band > 0, "band", f"must be a finite number of nats > 0, got {band!r}")
        _need(mode in MODES, "mode", f"must be one of {MODES}, got {mode!r}")
        _need(_finite_number(level) and 0 < level < 1, "level", f"must be in (0, 1), got {level!r}")
        _need(
            _finite_number(min_scale) and 0 < min_scale <= 1,
            "min_scale",
            f"must be in (0, 1], got {min_scale!r}",
        )
        _need(_finite_number(max_bonus) and max_bonus > 0, "max_bonus", f"must be > 0, got {max_bonus!r}")
        _need(aim in AIMS, "aim", f"must be one of {AIMS}, got {aim!r}")
        self.target, self.band, self.mode, self.level = target, float(band), mode, float(level)
        self.min_scale, self.max_bonus, self.aim = float(min_scale), float(max_bonus), aim
        self.z = NormalDist().inv_cdf(0.5 + self.level / 2)  # two-sided
        self.steps = 0  # decisions made: the schedule's step when decide() is given none

    def target_at(self, step: int) -> float:
        """The target (nats) at ``step``: the number, or the schedule's value (checked finite)."""
        value = self.target(step) if callable(self.target) else self.target
        _need(
            _finite_number(value),
            "target",
            f"the schedule gave {value!r} at step {step}, not a finite number",
        )
        return float(value)

    def decide(
        self, result, step: int | None = None, entropy: float | None = None, model=None, optimizer=None
    ):
        """The decision for the step ``result`` forecasts. ``step``: for a schedule (None: the number of
        decisions made so far); ``entropy``: the entropy now in nats (None: ``result.entropy``); ``model``
        and ``optimizer``: the ones stepping (needed by "steer": the direction map and ``.grad``)."""
        step = self.steps if step is None else int(step)
        self.steps += 1
        target = self.target_at(step)
        h0 = float(result.entropy if entropy is None else entropy)
        _need(math.isfinite(h0), "entropy", f"the entropy now must be finite, got {h0!r}")
        if self.mode == "scale":
            return self._scale_decision(result, target, h0)
        st = steer(result, target, h0, self, (model, optimizer))
        lo, hi = h0 + st.change - self.z * st.se, h0 + st.change + self.z * st.se
        lr = float(result.first.lr)
        return ControlDecision(
            "steer", 1.0, st.coefficient, st.reason, target, h0, h0 + st.change, (lo, hi), lr, st.bonus
        )

    @contextlib.contextmanager
    def applied(self, optimizer, decision: ControlDecision) -> Iterator[None]:
        """``decision`` applied to the next ``optimizer.step()`` only: lrs x scale, ``.grad -= lambda
        Xbar_A``; both restored right after that step (a post-step hook, so a scheduler step later in the
        block sees the run's lrs) or on exit (no step taken, or the step raised)."""
        scale = float(decision.scale)
        _need(math.isfinite(scale) and 0 < scale <= 1, "decision.scale", f"must be in (0, 1], got {scale!r}")
        inner = unwrap_optimizer(optimizer)
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(
                f"EntropyController.applied: needs a torch.optim.Optimizer, got {type(inner).__name__}"
            )
        check_step_lr(decision.lr, inner, "EntropyController.applied")
        saved_lr = [group["lr"] for group in inner.param_groups]
        saved_grad = []
        restored = False

        def restore(*_):
            nonlocal restored
            if not restored:
                for group, lr in zip(inner.param_groups, saved_lr):
                    group["lr"] = lr
                for p, g in saved_grad:
                    p.grad.copy_(g)
                restored = True

        handle = inner.register_step_post_hook(restore)
        try:
            if scale != 1.0:
                for group, lr in zip(inner.param_groups, saved_lr):
                    group["lr"] = lr * scale
            for p, x_a in decision.bonus or () if decision.coefficient != 0 else ():
                saved_grad.append((p, p.grad.clone()))
                p.grad.add_(x_a.to(p.grad.dtype), alpha=-decision.coefficient)  # loss - lambda H_A
            yield
        finally:
            handle.remove()
            restore()

    # ---- scale ----------------------------------------------------------------------------------
    def _scale_decision(self, result, target: float, h0: float) -> ControlDecision:
        lo_edge, hi_edge = target - self.band - h0, target + self.band - h0  # allowed changes
        at, c_max = self._interval_at(result)
        value, lo, hi = at(c_max)
        if float(result.first.lr) == 0.0 or (value == lo == hi == 0.0):
            return self._scaled(result, target, h0, at, 1.0, NO_STEP)
        inside = lo_edge <= 0.0 <= hi_edge
        if inside:
            ok = lambda c: min(at(c)[1] - lo_edge, hi_edge - at(c)[2])  # noqa: E731
        elif (lo > 0) if hi_edge < 0 else (hi < 0):  # outside, and surely moving further away: stop it
            return self._scaled(result, target, h0, at, self.min_scale, AWAY)
        else:  # outside, not surely moving away (a noisy step is not stopped): only the far edge binds
            ok = (lambda c: hi_edge - at(c)[2]) if lo_edge > 0 else (lambda c: at(c)[1] - lo_edge)  # noqa: E731
        reason = (UNTRUSTED if c_max < 1 else WITHIN) if inside else TOWARD
        if ok(c_max) >= 0:
            return self._scaled(result, target, h0, at, c_max, reason)
        c = self._solve(ok, c_max, result)
        return self._scaled(result, target, h0, at, c, SCALED if inside else TOWARD)

    def _interval_at(self, result):
        """``(at, c_max)``: ``at(c) = (change, lo, hi)`` of the step at ``c eta``, and the largest scale the
        prediction covers (below 1 when nothing predicts the full step: the Taylor forecast's range)."""
        pred, z = getattr(result, "prediction", None), self.z
        if pred is not None and pred.method == "lookahead" and pred.reliable and pred.stepped is not None:
            per_unit = result.first.per_unit

            def look(c: float):
                v, se = (pred.value, pred.se) if c == 1.0 else _change(pred.stepped.at(c, per_unit))
                return v, v - z * se, v + z * se

            return look, 1.0
        c_max = 1.0
        if pred is not None and not pred.reliable and pred.diagnostic is not None:
            c_max = pred.diagnostic.max_reliable_scale()
        if result.second is None:  # first order: the change and its interval are linear in c
            lo1, hi1 = result.interval(self.level)
            d1 = float(result.first.delta_h1)
            return (lambda c: (c * d1, c * lo1, c * hi1)), c_max
        fc = forecast_of(result)

        def second(c: float):
            v, se = fc.at(c)
            return v, v - z * se, v + z * se

        return second, c_max

    def _solve(self, ok, c_max: float, result) -> float:
        """The largest c in (0, c_max) with ``ok(c) >= 0``, given ok(0) >= 0 > ok(c_max): closed form in
        first order, else halvings of c_max then bisection (a few forwards for the lookahead)."""
        lo, hi = 0.0, c_max
        for k in range(1, TRIALS + 1):
            c = c_max * 2.0**-k
            if ok(c) >= 0:
                lo = c
                break
            hi = c
        lookahead = getattr(result.prediction, "method", None) == "lookahead"
        for _ in range(REFINE if lookahead else 200):
            if hi - lo <= 1e-15 * c_max:
                break
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) >= 0 else (lo, mid)
        return lo if lo > 0 else hi * 0.5

    def _scaled(self, result, target, h0, at, c: float, reason: str) -> ControlDecision:
        value, lo, hi = at(c)
        lr = float(result.first.lr)
        return ControlDecision("scale", c, 0.0, reason, target, h0, h0 + value, (h0 + lo, h0 + hi), lr)


def _change(change) -> tuple[float, float]:
    return float(change.delta_h), float(change.se)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _need(ok: bool, name: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"EntropyController: {name} {msg}")
