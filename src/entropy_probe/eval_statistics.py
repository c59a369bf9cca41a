"""Step 3 of a call: every rank's per-unit values -> the statistics over E with U fixed (DESIGN section 5).

float64 moments ``(count, mean, M2)`` are merged over ranks (Chan), with the entropy on E and the count
of dropped rows riding along in the same all_gather; then the per-unit values themselves (s_n, the
unit ids, q_n of the second order and s_n^(g) by parameter group, whichever the call has) are gathered
in rank order in ONE collective, for the jackknife, the second order and the attribution.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import RolloutBatch
from .context import ProbeCall
from .distributed import merged_moments
from .engines import EvalProjections
from .objectives import unit_entropy
from .result import FirstOrder
from .statistics import conditional_variance, jackknife_se, moments_update


@dataclass
class EvalStatistics:
    """Step 3 of a call: the E statistics, over all ranks.

    s, unit_ids: ``(B_E,)`` the s_n and their group ids in rank order; q: ``(B_E,)`` float64 q_n (second
    order) or None; s_groups: ``(B_E, n_groups)`` float64 s_n^(g) or None; sizes: E units per rank; the
    rest as in ``ProbeResult``.
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
    sizes: list[int] | None = None
    caveat: str | None = None  # why se_cond_e cannot be trusted (identical units), or None
    q: Tensor | None = None
    s_groups: Tensor | None = None

    def first_order(self, lr: float) -> FirstOrder:
        """``result.first``."""
        return FirstOrder(
            delta_h1=self.delta_h1,
            se_cond_e=self.se_cond_e,
            var_cond_e=self.var_cond_e,
            se_jackknife=self.se_jackknife,
            entropy=self.entropy,
            n_eval_units=self.n_eval,
            lr=lr,
            per_unit=self.s.detach().double().cpu(),
            eval_unit_ids=self.unit_ids.cpu(),
            n_dropped_rows=self.n_dropped_rows,
        )


def unit_table(local_s: Tensor, ids: Tensor, q: Tensor | None, s_groups: Tensor | None) -> Tensor:
    """``(B_local, 2 [+ 1] [+ n_groups])`` float64 columns s_n, id, [q_n], [s_n^(g)]: one gather for all
    (float64 holds the fp32 s_n and the integer ids exactly)."""
    cols = [local_s.double().reshape(-1, 1), ids.to(local_s.device).double().reshape(-1, 1)]
    if q is not None:
        cols.append(q.double().to(local_s.device).reshape(-1, 1))
    if s_groups is not None:
        cols.append(s_groups.double().to(local_s.device))
    return torch.cat(cols, dim=1)


def eval_statistics(
    call: ProbeCall, proj: EvalProjections, batch: RolloutBatch | None, q_local: Tensor | None = None
) -> EvalStatistics:
    """float64 moments merged over ranks, then the per-unit values in one gather (module docstring).

    ``batch``: this rank's E (None for none); ``q_local``: its q_n when the second order is on."""
    comm, lr = call.comm, call.lr
    # with groups, s_n is their float64 sum, so that the groups add up to delta_h1 to float64 rounding
    local_s = proj.s if proj.s_groups is None else proj.s_groups.sum(dim=1)
    device = local_s.device
    if batch is not None:
        own = proj.entropy_sum  # the token-level pieces bring their own (the trainers' formula)
        entropy, ids, dropped = (
            unit_entropy(proj.weighted, batch).double().sum() if own is None else own.double(),
            batch.unit_ids,
            batch.n_dropped_rows,
        )
    else:
        entropy, ids, dropped = torch.zeros((), dtype=torch.float64, device=device), local_s.long(), 0
    extra = torch.stack([entropy, torch.tensor(float(dropped), dtype=torch.float64, device=device)])
    moments, sums, sizes = merged_moments(comm, moments_update(local_s), extra)
    n_eval = int(moments.count)
    if n_eval == 0:
        raise ValueError("eval_batch: no rank holds any evaluation unit")
    table = comm.gather(unit_table(local_s, ids, q_local, proj.s_groups), sizes)  # (B_E, k) rank order
    s, unit_ids = table[:, 0].to(local_s.dtype), table[:, 1].long()  # (B_E,), (B_E,)
    q = None if q_local is None else table[:, 2]
    s_groups = None if proj.s_groups is None else table[:, 2 + (q_local is not None) :]  # (B_E, n_groups)
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
        q=q,
        s_groups=s_groups,
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
