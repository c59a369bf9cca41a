"""Checks of docs/design.md sections 6 and 7 for ``entropy-probe validate``: se_total and the skew-aware
interval.

- se_total: over K independent (U, E) pairs on the enumerable policy, ``var(delta_h1) / mean(se_total^2)``
  lies in its chi-square band, widened for the kurtosis of delta_h1 and the noise of the denominator
  (``checks.variance_check`` with one "unit" per pair). Four direction maps: sgd, adam-preconditioned
  with a fresh optimizer (v ~ sign(g): the map the old V_Y term got 300x wrong) and warm (state from
  three real AdamW steps), optimizer-step warm with clipping.
- interval: over K independent E draws with v fixed, the share of ``result.interval(0.95)`` that holds
  the exact ``eta grad H . v`` (enumeration), on the skewed case of the issue ("sum" weighting,
  temperature 0.7) at B_E = 16 and 32 and on an easy case; the count is binomial, so the check is
  that the share is not below its target by more than k binomial SEs.
"""

from __future__ import annotations

import math

import torch

from ..config import ProbeConfig
from ..loss import policy_loss
from ..probe import EntropyProbe
from ..toy import TabularPolicy, exact_directional_derivative, sample_enumerated
from .checks import variance_check
from .problem import Check
from .stats import excess_kurtosis

SE_TOTAL_CASES = (("sgd", 0), ("adam-preconditioned", 0), ("adam-preconditioned", 3), ("optimizer-step", 3))
CLIP = 0.5  # optimizer-step's max_grad_norm: about the toy's gradient norm, so clipping is sometimes active
LR = 3e-2


def _policy_and_optimizer(direction: str, warm_steps: int, seed: int, scale: float = 1.0):
    """The toy policy and, for the Adam directions, an AdamW with ``warm_steps`` real steps of state."""
    policy = TabularPolicy(seed=seed, scale=scale)
    if direction == "sgd":
        return policy, None
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.01)
    for k in range(warm_steps):
        optimizer.zero_grad()
        policy_loss(policy, sample_enumerated(policy, 8, seed=10_000 + k), ProbeConfig()).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return policy, optimizer


def se_total_pairs(
    direction: str,
    warm_steps: int,
    n_pairs: int,
    update_units: int,
    eval_units: int,
    seed: int = 0,
    scale: float = 1.0,
) -> dict:
    """delta_h1, se_total^2 and var_cond_e over ``n_pairs`` independent (U, E) pairs (policy ``seed``, table
    ``scale``)."""
    policy, optimizer = _policy_and_optimizer(direction, warm_steps, seed, scale)
    clip = CLIP if direction == "optimizer-step" else None
    cfg = ProbeConfig(lr=LR, direction=direction, max_grad_norm=clip, entropy="sequence")
    probe = EntropyProbe(policy, optimizer, cfg)
    out = dict(delta_h1=[], se_total2=[], var_cond_e=[])
    base = 1_000_003 * (seed + 1)
    for k in range(n_pairs):
        r = probe.run(
            sample_enumerated(policy, update_units, seed=base + 2 * k),
            sample_enumerated(policy, eval_units, seed=base + 2 * k + 1),
        )
        out["delta_h1"].append(r.delta_h1)
        out["se_total2"].append(r.se_total**2)
        out["var_cond_e"].append(r.var_cond_e)
    return out


def se_total_check(direction: str, warm_steps: int, data: dict, k: float) -> Check:
    """``var(delta_h1) / mean(se_total^2)`` in its kurtosis-widened chi-square band (one unit per pair)."""
    kurt = excess_kurtosis(data["delta_h1"])
    name = f"se_total ({direction}, {'warm' if warm_steps else 'fresh'})"
    return variance_check(name, data["delta_h1"], data["se_total2"], kurt, 1, k)


def interval_coverage(
    weighting: str, temperature: float, eval_units: int, n_draws: int, seed: int = 0, level: float = 0.95
) -> tuple[int, int]:
    """(covering draws, draws) of ``result.interval(level)`` against the exact change, v fixed (sgd)."""
    policy = TabularPolicy(seed=seed)
    cfg = ProbeConfig(
        lr=1e-2, direction="sgd", entropy="sequence", entropy_weighting=weighting, temperature=temperature
    )
    probe = EntropyProbe(policy, config=cfg)
    v = probe.update_direction(sample_enumerated(policy, 64, seed=seed + 1, temperature=temperature))
    exact = cfg.lr * exact_directional_derivative(policy, v, weighting, temperature)
    covered = 0
    for k in range(n_draws):
        r = probe.run(
            eval_batch=sample_enumerated(
                policy, eval_units, seed=7_000_001 * (seed + 1) + k, temperature=temperature
            ),
            direction=v,
        )
        lo, hi = r.interval(level)
        covered += lo <= exact <= hi
    return covered, n_draws


def coverage_floor_check(name: str, covered: int, n: int, target: float, k: float) -> Check:
    """The share must not lie below ``target`` by more than k binomial SEs ``sqrt(t(1-t)/n)``."""
    share, floor = covered / n, target - k * math.sqrt(target * (1 - target) / n)
    return Check(
        name,
        share >= floor,
        f"coverage {share:.3f} ({covered}/{n})",
        f">= {floor:.3f} (target {target})",
        dict(coverage=share, covered=covered, draws=n, target=target, floor=floor),
    )
