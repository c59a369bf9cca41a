"""The demo's entropy measurements outside the probe: the fresh samples F before and after each step, in
the run's functional, and the entropy a trainer logs for its training batch.

Both functionals are a ratio of per-unit means, ``H = sum_n N_n / sum_n D_n`` over the B units (prompts):
- ``entropy="token"``: ``N_n`` the unit's mean of ``sum_t m_t H_t`` (exact full-vocabulary entropies),
  ``D_n`` its mean response length; ``H`` is the trainers' ``sum(m H_t) / sum(m)`` on the batch;
- ``entropy="sequence"``: ``N_n = -(1/G) sum_i S_w,i``, ``D_n = 1``; ``H`` is the mean over units.
The SE is the delta method's over units, from the influence ``(N_n - H D_n) / mean(D)`` (the probe's own
per-unit values, ``token_functional.ratio_level_unit_values``, less their mean; for
"sequence" the plain SE of a mean); the paired change before/after on the same units has the
difference of the two influences.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..logprobs import policy_logprobs, token_terms
from ..objectives import unit_entropy
from ..sampling import sample_rollouts
from ..token_entropy import unit_totals
from ..token_functional import ratio_level_unit_values
from .config import DemoConfig
from .task import SortingTask


class Fresh(NamedTuple):
    """Per unit, ``(B_F,)`` float64 on the CPU: the entropy's numerator and denominator, the mean reward."""

    numerator: Tensor
    denominator: Tensor
    reward: Tensor


@torch.no_grad()
def unit_entropy_terms(model: nn.Module, batch: RolloutBatch, probe_cfg: ProbeConfig) -> tuple[Tensor, ...]:
    """``(N_n, D_n)`` of ``probe_cfg``'s functional on ``batch`` (module docstring), float64 on the CPU."""
    if probe_cfg.entropy == "token":
        terms = token_terms(model, batch, probe_cfg.temperature)
        totals = unit_totals(terms.entropy, terms.mask, batch)
        return totals.numerator.cpu(), totals.denominator.cpu()
    weighted = policy_logprobs(model, batch, probe_cfg).weighted
    h = unit_entropy(weighted, batch).double().cpu()
    return h, torch.ones_like(h)


def fresh_sample(
    model: nn.Module, task: SortingTask, prompts, cfg: DemoConfig, seed: int, probe_cfg: ProbeConfig
) -> Fresh:
    """Sample ``group_size`` responses to each prompt (seeded) and measure them: the per-unit values."""
    batch = sample_rollouts(
        model,
        prompts,
        cfg.group_size,
        task.max_new_tokens,
        task.eos,
        task.reward,
        probe_cfg.temperature,
        seed,
    )
    num, den = unit_entropy_terms(model, batch, probe_cfg)
    g = batch.unit_sizes.double().cpu()
    rewards = torch.zeros(batch.n_units, dtype=torch.float64)
    rewards.index_add_(0, batch.unit_index.cpu(), batch.rewards.double().cpu())
    return Fresh(num, den, rewards / g)


def _ratio_influence(f: Fresh) -> tuple[float, Tensor]:
    """``H = sum N / sum D`` and each unit's influence on it, ``(B,)`` (its mean is 0)."""
    h = float(f.numerator.sum() / f.denominator.sum())
    u = ratio_level_unit_values(torch.stack([f.numerator, f.denominator], dim=1))  # (B, 2) -> (B,)
    return h, u - u.mean()  # the delta method's influences: u less its (jackknife-corrected) mean


def _se(influence: Tensor) -> float:
    return float(influence.std() / math.sqrt(influence.numel()))


def entropy_mean_se(f: Fresh) -> tuple[float, float]:
    """The entropy of the fresh samples and its SE over units."""
    h, influence = _ratio_influence(f)
    return h, _se(influence)


def paired_change(before: Fresh, after: Fresh) -> tuple[float, float]:
    """``H_after - H_before`` on the same units (same prompts and seed), and its paired SE over units."""
    h0, i0 = _ratio_influence(before)
    h1, i1 = _ratio_influence(after)
    return h1 - h0, _se(i1 - i0)


def mean_se(x: Tensor) -> tuple[float, float]:
    """The mean of ``x`` and its SE."""
    return float(x.mean()), _se(x - x.mean())


@torch.no_grad()
def trainer_entropy(model: nn.Module, batch: RolloutBatch, temperature: float) -> float:
    """The ``entropy`` TRL (verl, OpenRLHF) logs for a training batch: ``sum(m H_t) / sum(m)`` over its
    response tokens, H_t the full-vocabulary entropy at the sampling temperature (from the logits of the
    training rollouts themselves: no other sample)."""
    terms = token_terms(model, batch, temperature)
    totals = unit_totals(terms.entropy, terms.mask, batch)
    return float(totals.entropy_sum / totals.token_count)
