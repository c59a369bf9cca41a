"""The validation problem: the enumerable policy, a fixed U, its direction v and the exact answers."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..logprobs import WEIGHTINGS
from ..probe import EntropyProbe
from ..toy import TabularPolicy, exact_directional_derivative, exact_entropy, sample_enumerated
from ..vectors import stepped_parameters

CONTROL = "seed estimator"  # the note's biased X_n, run on the same shards as a negative control
TOKEN = "token"  # ProbeConfig(entropy="token") on the same shards


@dataclass(frozen=True)
class Settings:
    """Sizes of the experiments. B_E and B_U count units (prompts), each with ``group_size`` responses."""

    n_shards: int  # K independent E shards for calibration and unbiasedness
    shard_units: int  # B_E of one shard
    scale_units: int  # B_E at c = 1 in the SE-scaling check
    scale_replicates: int  # independent shards per scale factor c
    truth_units: int  # B_E of the truth check
    group_size: int = 4
    update_units: int = 32
    scale_factors: tuple[int, ...] = (1, 2, 4, 8)
    alphas: tuple[float, ...] = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
    policy_scale: float = 2.0  # logits ~ N(0, 2^2): a peaked policy, so steps move entropy visibly
    curvature: float = 0.2  # eta is chosen so the exact H(theta + eta v) departs 20% from the tangent
    total_pairs: int = 200  # independent (U, E) pairs per direction map in the se_total calibration
    total_units: tuple[int, int] = (8, 16)  # (B_U, B_E) of each pair
    interval_draws: int = 400  # independent E draws per case in the interval-coverage check


# B_E = 32 per shard: the interval delta_h1 -+ 1.96 SE, whose SE is estimated from the same skewed s_n,
# covers less than 95% by O(1/B_E) (measured for the "sum" weighting: 0.90 at B_E = 16, 0.94 at 32);
# the coverage check tests the expected finite-B_E coverage, which at 32 is still within 2% of 0.95.
FULL = Settings(n_shards=300, shard_units=32, scale_units=16, scale_replicates=24, truth_units=1024)
QUICK = Settings(
    n_shards=100,
    shard_units=32,
    scale_units=8,
    scale_replicates=10,
    truth_units=192,
    total_pairs=100,
    interval_draws=150,
)


@dataclass
class Check:
    """One row of the table: what was measured, against which tolerance, and the numbers behind it."""

    name: str
    passed: bool
    measured: str
    tolerance: str
    figures: dict = field(default_factory=dict)


# ---- the problem: a policy, a fixed U, its direction v, and the exact answers -----------------------
@dataclass
class Problem:
    """What every check shares: the policy, the fixed U, its direction v, eta and the exact answers."""

    policy: TabularPolicy
    update_batch: RolloutBatch
    v: dict[str, torch.Tensor]
    lr: float
    entropy: float  # exact H(theta), token-mean weighting
    exact_slope: dict[str, float]  # exact grad H . v per weighting (delta_h1 estimates lr times it)


def _seed(seed: int, *offsets: int) -> int:
    """Distinct, reproducible sampling seeds for every experiment of one harness seed."""
    return 1_000_003 * seed + sum(o * 10_007**i for i, o in enumerate(offsets, start=1))


def exact_entropy_at(
    policy: TabularPolicy, v: dict[str, torch.Tensor], step: float, weighting: str = "token-mean"
) -> float:
    """Exact ``H(theta + step * v)`` by enumeration, on a copy of the policy (the original untouched)."""
    stepped = copy.deepcopy(policy)
    with torch.no_grad():
        for name, value in stepped_parameters(dict(policy.named_parameters()), v, step).items():
            stepped.get_parameter(name).copy_(value)
        return float(exact_entropy(stepped, weighting))


def choose_lr(
    policy: TabularPolicy, v: dict[str, torch.Tensor], slope: float, entropy: float, curvature: float
) -> float:
    """The smallest eta = 1e-3 * sqrt(2)^j whose exact change departs from the tangent by ``curvature``.

    The truth check needs a step whose nonlinearity is visible at alpha = 1 and vanishes as alpha -> 0.
    """
    lr = 1e-3
    for _ in range(40):
        ratio = (exact_entropy_at(policy, v, lr) - entropy) / (lr * slope)
        if abs(ratio - 1.0) >= curvature:
            return lr
        lr *= math.sqrt(2.0)
    return lr


def build_problem(seed: int, s: Settings) -> Problem:
    policy = TabularPolicy(seed=seed, scale=s.policy_scale)
    update_batch = sample_enumerated(
        policy, n_units=s.update_units, group_size=s.group_size, seed=_seed(seed, 1)
    )
    # Without optimizer state Adam's preconditioner is that of its own first step; v does not depend on lr.
    v = EntropyProbe(policy, config=ProbeConfig(lr=1.0)).update_direction(update_batch)
    exact_slope = {w: exact_directional_derivative(policy, v, w) for w in WEIGHTINGS}
    with torch.no_grad():
        entropy = float(exact_entropy(policy))
    lr = choose_lr(policy, v, exact_slope["token-mean"], entropy, s.curvature)
    return Problem(policy, update_batch, v, lr, entropy, exact_slope)


def _probe(problem: Problem, **config) -> EntropyProbe:
    return EntropyProbe(problem.policy, config=ProbeConfig(lr=problem.lr, unconditional_se=False, **config))


# ---- the pure statistics of each check (unit-tested on synthetic data) -----------------------------
