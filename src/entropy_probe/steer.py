"""The "steer" decision of ``EntropyController`` (docs/design.md section 19): an entropy bonus solved per
step.

The optimizer is about to step on ``g`` (the ``.grad`` now). Adding ``-lambda Xbar_A`` to it (the
gradient of ``loss - lambda H_A``, with ``Xbar_A`` the entropy-gradient estimate on half A of E) gives
the step ``eta v(g - lambda Xbar_A)``, with ``v`` the optimizer's exact direction map
(``direction.build_direction``: "optimizer-step" for Adam/AdamW, moments, bias correction and decay
included; "sgd" for plain SGD). Its first-order entropy change, estimated on the other half,

    delta_B(lambda) = eta Xbar_B . v(g - lambda Xbar_A)

is unbiased for ``grad H . v(g - lambda Xbar_A)`` given A, because the halves are independent given
theta. For SGD it is linear in lambda (solved in closed form); for Adam it is solved numerically: a
bracket from lambda = 0 outwards in doublings of ``lambda_0 = |g| / |Xbar_A|`` up to ``max_bonus
lambda_0``, then Illinois regula falsi (one direction map per evaluation, parameter-sized, no forward).

The interval: ``delta_B -+ z se_B``, with ``se_B`` the SE of the unmodified step's forecast on half B
(eta sd(s_n, n in B) / sqrt(|B|)): the noise of the bonus's own projection on B is not in it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .direction import build_direction
from .from_grad import check_step_lr, optimizer_lr, unwrap_optimizer
from .update_jackknife import _dot64

RESIDUAL_TOL = 1e-13  # nats: the solve stops when the half-B prediction is this close to its aim
SOLVED_TOL = 1e-10  # nats (relative above 1 nat): closer counts as solved; else a jump of the map
# Steer.reason (ControlDecision.reason)
NO_STEP = "no-step"  # lr 0, a zero gradient or a zero Xbar_A: lambda 0
WITHIN = "within-band"  # the unmodified step's half-B prediction lands inside the band: lambda 0
STEERED = "steered"  # lambda solves prediction_B(lambda) = aim
CAPPED = "bonus-capped"  # no |lambda| <= max_bonus lambda_0 reaches the aim: the one nearest to it
NO_DIRECTION = "no-direction"  # the bonus does not move the half-B prediction towards the aim: lambda 0


class Steer(NamedTuple):
    """lambda, the half-B predicted change at it and its SE (nats), why, and the bonus direction."""

    coefficient: float
    change: float
    se: float
    reason: str
    bonus: list | None  # [(parameter, its Xbar_A)] when lambda != 0


def steer(result, target: float, h0: float, ctl, model_optimizer: tuple) -> Steer:
    """The steering of ``ctl`` (an ``EntropyController``: band, aim, max_bonus) for ``result``, from the
    entropy ``h0`` now towards ``target``; ``model_optimizer``: the ones about to step."""
    model, optimizer = model_optimizer
    halves, inner, params = _inputs(result, model, optimizer)
    eta, kind = float(result.first.lr), _map_kind(inner)
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    g_norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads.values()))
    a_norm = math.sqrt(sum(float(halves.x_a[n].double().square().sum()) for n in grads))

    def delta_b(lam: float) -> float:  # eta Xbar_B . v(g - lam Xbar_A)
        ascent = {
            n: None if n not in grads else grads[n].float().neg().add_(halves.x_a[n], alpha=lam)
            for n in params
        }
        v = build_direction(kind, ascent, params, inner, optimizer_lr(inner)).v
        return eta * float(_dot64(v, halves.x_b))

    s_b = result.first.per_unit.double().reshape(-1)[1::2]  # half B: odd global unit positions
    se_b = eta * float(s_b.std()) / math.sqrt(s_b.numel()) if s_b.numel() > 1 else 0.0

    def decision(lam: float, value: float, reason: str) -> Steer:
        bonus = [(params[n], halves.x_a[n]) for n in grads] if lam != 0 else None
        return Steer(lam, value, se_b, reason, bonus)

    f0 = delta_b(0.0)
    if eta == 0.0 or g_norm == 0.0 or a_norm == 0.0:
        return decision(0.0, f0, NO_STEP)
    after = h0 + f0
    if ctl.aim == "band" and abs(after - target) <= ctl.band:
        return decision(0.0, f0, WITHIN)
    aim = target if ctl.aim == "target" else min(max(after, target - ctl.band), target + ctl.band)
    lam, value, how = _solve(delta_b, aim - h0, f0, g_norm / a_norm * ctl.max_bonus, kind == "sgd")
    return decision(lam, value, {"solved": STEERED, "capped": CAPPED, "none": NO_DIRECTION}[how])


def _solve(f, need: float, f0: float, cap: float, linear: bool) -> tuple[float, float, str]:
    """``(lambda, f(lambda), how)``: ``f(lambda) = need`` with |lambda| <= cap ("solved"); else the
    lambda nearest to it ("capped": the need lies beyond the cap, or Adam's map jumps across it, as it
    does where a coordinate's second moment is ~0), or 0 when nothing moves f towards it ("none")."""
    if linear:  # f(lam) = f0 + lam k
        k = (f(cap) - f(-cap)) / (2 * cap)
        if k == 0:
            return 0.0, f0, "none"
        lam = min(max((need - f0) / k, -cap), cap)
        return lam, f(lam), "solved" if abs(lam) < cap else "capped"
    best = (0.0, f0)
    for side in (1.0, -1.0):  # the root nearest 0 on either side (Adam's map need not be monotone)
        lo, f_lo, lam = 0.0, f0, cap / 64
        while True:  # bracket: doublings outwards from 0 until f crosses the need, or the cap
            lam = min(2 * lam, cap)
            value = f(side * lam)
            if (value - need) * (f0 - need) <= 0:
                found = _illinois(f, need, (lo, f_lo), (side * lam, value))
                break
            found = (side * lam, value)
            if lam >= cap:
                break
            lo, f_lo = side * lam, value
        if abs(found[1] - need) <= SOLVED_TOL * max(1.0, abs(need)):
            return found[0], found[1], "solved"
        best = min(best, found, key=lambda x: abs(x[1] - need))
    return best[0], best[1], "none" if best[0] == 0.0 else "capped"


def _illinois(f, need: float, left, right) -> tuple[float, float]:
    """Regula falsi with the Illinois rule on a bracket whose ends straddle ``need``."""
    (a, fa), (b, fb) = left, right
    fa, fb = fa - need, fb - need
    side = 0
    for _ in range(100):
        c = (a * fb - b * fa) / (fb - fa) if fb != fa else (a + b) / 2
        fc = f(c) - need
        if abs(fc) <= RESIDUAL_TOL or abs(b - a) <= 1e-15 * max(abs(a), abs(b)):
            return c, fc + need
        if fc * fb > 0:
            b, fb = c, fc
            if side == -1:
                fa /= 2
            side = -1
        else:
            a, fa = c, fc
            if side == 1:
                fb /= 2
            side = 1
    return c, fc + need


def _inputs(result, model, optimizer):
    """(the halves, the torch optimizer, the trainable parameters), each checked."""
    halves = getattr(result, "halves", None)
    if halves is None:
        raise ValueError(
            'EntropyController(mode="steer"): result.halves is None; run the probe with '
            "ProbeConfig(keep_halves=True) (the mean X on the two halves of E)"
        )
    if halves.sizes[1] == 0:
        raise ValueError('EntropyController(mode="steer"): needs B_E >= 2 E units (two halves of E)')
    if model is None or optimizer is None:
        raise ValueError(
            'EntropyController(mode="steer"): decide(result, model=..., optimizer=...) is required'
        )
    inner = unwrap_optimizer(optimizer)
    check_step_lr(float(result.first.lr), inner, "EntropyController.decide")
    module = getattr(model, "module", model)  # DDP
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(set(params) ^ set(halves.x_a))
    if missing:
        raise ValueError(
            f"EntropyController: result.halves is of another model (parameters {missing[:3]} differ)"
        )
    if all(p.grad is None for p in params.values()):
        raise ValueError('EntropyController(mode="steer"): no parameter has a .grad; decide after backward()')
    return halves, inner, params


def _map_kind(optimizer: torch.optim.Optimizer) -> str:
    """The direction map of the real step: "optimizer-step" (Adam/AdamW) or "sgd" (plain SGD)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "optimizer-step"
    if isinstance(optimizer, torch.optim.SGD) and all(
        g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 for g in optimizer.param_groups
    ):
        return "sgd"
    raise ValueError(
        'EntropyController(mode="steer"): the optimizer must be Adam, AdamW or plain SGD (no momentum, no '
        f"weight decay), got {type(optimizer).__name__}"
    )
