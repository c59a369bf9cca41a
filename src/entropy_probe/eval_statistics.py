"""Step 3 of a call: every rank's s_n -> the statistics over E with U fixed (DESIGN section 5).

float64 moments ``(count, mean, M2)`` are merged over ranks (Chan), then the s_n themselves are
gathered in rank order for the jackknife and attribution; the entropy on E and the count of dropped
rows ride along in the same all_gather.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import merged_moments
from .engines import EvalProjections
from .statistics import conditional_variance, jackknife_se, moments_update


@dataclass
class EvalStatistics:
    """Step 3 of a call: the E statistics, over all ranks.

    s, unit_ids: ``(B_E,)`` the s_n and their group ids in rank order; the rest as in ``ProbeResult``.
    """

    s: Tensor
    unit_ids: Tensor
    n_eval: int
    delta_h1: float
    var_cond_e: float
    se_cond_e: float
    se_jackknife: float
    entropy: float
    n_dropped_rows: int
    sizes: list[int] | None = None  # E units per rank
    caveat: str | None = None  # why se_cond_e cannot be trusted (identical units), or None


def eval_statistics(
    comm, proj: EvalProjections, local_entropy: Tensor, local_ids: Tensor, local_dropped: int, lr: float
) -> EvalStatistics:
    """float64 moments merged over ranks, then the s_n themselves for the jackknife and attribution."""
    # with groups, s_n is their float64 sum, so that the groups add up to delta_h1 to float64 rounding
    local_s = proj.s if proj.s_groups is None else proj.s_groups.sum(dim=1)
    dropped = torch.tensor(float(local_dropped), dtype=torch.float64, device=local_entropy.device)
    extra = torch.stack([local_entropy, dropped])
    moments, sums, sizes = merged_moments(comm, moments_update(local_s), extra)
    n_eval = int(moments.count)
    if n_eval == 0:
        raise ValueError("eval_batch: no rank holds any evaluation unit")
    s = comm.gather(local_s, sizes)  # (B_E,) over all ranks, rank order
    unit_ids = comm.gather(local_ids, sizes)  # (B_E,)
    bad = (~torch.isfinite(s)).nonzero()
    if len(bad):
        unit = int(bad[0, 0])
        raise ValueError(f"eval_batch: s_n is not finite for unit {int(unit_ids[unit])} (position {unit})")
    var_e, se_e = conditional_variance(moments, lr)
    caveat = identical_units_caveat(s)
    return EvalStatistics(
        s=s,
        unit_ids=unit_ids,
        n_eval=n_eval,
        delta_h1=lr * float(moments.mean),
        var_cond_e=var_e,
        se_cond_e=se_e,
        se_jackknife=jackknife_se(s, lr),
        entropy=float(sums[0]) / n_eval,
        n_dropped_rows=int(sums[1]),
        sizes=sizes,
        caveat=caveat,
    )


def identical_units_caveat(s: Tensor) -> str | None:
    """B_E > 1 units with identical non-zero s_n (the same prompt and responses repeated): their SE is 0,
    which says nothing of the variance over E. A warning, and the result is flagged unreliable.
    (All s_n 0 is a step that does not move, v = 0: SE 0 is then right.)"""
    if s.numel() < 2 or not bool((s == s[0]).all()) or float(s[0]) == 0.0:
        return None
    caveat = (
        f"eval_batch: all {s.numel()} evaluation units give the same s_n (identical units?): se_cond_e is 0, "
        "which does not measure the variance over E; use independent evaluation prompts"
    )
    warnings.warn(caveat, RuntimeWarning, stacklevel=3)
    return caveat
