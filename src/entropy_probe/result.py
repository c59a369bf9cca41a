"""What a probe call returns: ``ProbeResult`` and, with ``truth=True``, ``TruthResult``.

Metric names of ``to_dict()`` (flat, JSON-ready, for loggers), all under ``entropy_probe/``:

==================  ==========================================================================
delta_h1            predicted entropy change of the step, ``eta * Xbar_E . v`` (nats)
se_cond_e           its SE over E with U fixed (the founding note's key result)
var_cond_e          ``se_cond_e ** 2``
se_jackknife        delete-one jackknife SE over E units from the gathered s_n; for a mean it equals
                    se_cond_e algebraically, so it is a numerical check of the float64 moment merge
se_total            unconditional SE ``sqrt(var_cond_e + var_update)`` (None without U)
var_update          V_U, the variance over U: jackknife through the exact direction map (None without U)
interval_method     how ``interval()`` is built: "hull(student-t, bootstrap-t)" (DESIGN section 14)
reliable            False when the probe knows a number may be wrong (``caveats`` says why)
interval_lo95/hi95  ``interval(0.95)``
truth/reliable      False when the importance weights are degenerate (ESS below truth.ess_threshold)
entropy             entropy of the policy on E before the step, ``mean_n -(1/G) sum S_w`` (nats)
n_eval_units        B_E
n_update_units      B_U (0 when the direction was given or came from .grad)
n_dropped_rows      E rows with no response token, dropped from their units
lr                  eta
delta_h2            second-order term ``(eta^2/2) v^T grad^2 H v`` (only with ``second_order=True``)
se_delta_h2         its SE over E
forecast            ``delta_h1 + delta_h2``; se_forecast its SE over E (from the per-unit combined values)
group/<name>        ``delta_h1`` of parameter group <name> (by_group; the groups sum to delta_h1)
group/<name>/se     its SE over E
truth/delta_h       measured change at alpha = 1 (or the last alpha), importance-weighted on E
truth/se            its jackknife SE over E units
truth/ess           effective sample size of the importance weights
truth/se_diff       jackknife SE of ``delta_h - delta_h1`` on the same E
truth/slope         least-squares slope of delta_h(alpha) through the origin
truth/se_diff_forecast  jackknife SE of ``delta_h - forecast`` on the same E (second order on)
==================  ==========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

from torch import Tensor

from .statistics import skew_aware_interval

INTERVAL_METHOD = "hull(student-t, bootstrap-t)"

PREFIX = "entropy_probe/"


@dataclass
class TruthResult:
    """The measured entropy change of ``theta + alpha * eta * v`` (DESIGN section 6)."""

    delta_h: float
    se: float
    ess: float
    se_diff: float
    alphas: list[float] = field(default_factory=list)
    delta_h_at: list[float] = field(default_factory=list)
    se_at: list[float] = field(default_factory=list)
    ess_at: list[float] = field(default_factory=list)
    se_diff_at: list[float] = field(default_factory=list)
    slope: float = math.nan
    se_diff_forecast: float | None = None  # jackknife SE of delta_h - forecast (second order on)
    reliable: bool = True
    """False when the importance weights are degenerate (ESS below ``truth.ess_threshold``)."""

    def to_dict(self) -> dict:
        keys = ("delta_h", "se", "ess", "se_diff", "slope", "reliable")
        out = {f"{PREFIX}truth/{k}": getattr(self, k) for k in keys}
        if self.se_diff_forecast is not None:
            out[f"{PREFIX}truth/se_diff_forecast"] = self.se_diff_forecast
        for a, d in zip(self.alphas, self.delta_h_at):
            out[f"{PREFIX}truth/delta_h@{a:g}"] = d
        return out


@dataclass
class ProbeResult:
    """The forecast of one optimizer step's entropy change, with its uncertainty."""

    delta_h1: float
    se_cond_e: float
    var_cond_e: float
    se_jackknife: float
    se_total: float | None
    entropy: float
    n_eval_units: int
    n_update_units: int
    lr: float
    per_unit: Tensor  # (B_E,) float64 s_n, in eval-unit order: unit n contributes lr * s_n / B_E
    eval_unit_ids: Tensor  # (B_E,) group id of each eval unit
    truth: TruthResult | None = None
    n_dropped_rows: int = 0  # E rows with no response token, dropped from their units (summed over ranks)
    eval_state: object | None = field(default=None, repr=False, compare=False)  # change.EvalState, for
    # probe.measure_change: E and its log-probs at the forecast's parameters (never in to_dict)
    delta_h2: float | None = None  # (eta^2/2) mean_n q_n; None without second_order
    se_delta_h2: float | None = None  # (eta^2/2) sqrt(var(q) / B_E)
    forecast: float | None = None  # delta_h1 + delta_h2
    se_forecast: float | None = None  # sqrt(var(eta s_n + eta^2/2 q_n) / B_E)
    per_unit_q: Tensor | None = None  # (B_E,) float64 q_n, eval-unit order: unit n adds eta^2/2 q_n / B_E
    by_group: dict[str, tuple[float, float]] | None = None  # {group: (delta_h1_g, se_g)}, summing to delta_h1
    var_update: float | None = None  # V_U: se_total ** 2 = var_cond_e + var_update
    update_influence: Tensor | None = None  # (B_U,) float64 per U unit (update_jackknife); None without U
    update_unit_ids: Tensor | None = None  # (B_U,) group id of each U unit, the order of update_influence
    interval_method: str = INTERVAL_METHOD
    reliable: bool = True
    """False when the probe knows a number may be wrong: the direction rule is not the optimizer's step
    (from_grad), or the E units are identical (SE 0 from B_E > 1 units); ``caveats`` says why."""
    caveats: tuple[str, ...] = ()

    def forecast_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Normal interval of ``forecast`` over E, ``forecast -+ z * se_forecast``; needs second_order."""
        if self.forecast is None:
            raise ValueError(
                "forecast_interval: no second-order term in this result; run with "
                "ProbeConfig(second_order=True)"
            )
        if not 0.0 < level < 1.0:
            raise ValueError(f"forecast_interval: level must be in (0, 1), got {level!r}")
        z = NormalDist().inv_cdf(0.5 + level / 2)
        return self.forecast - z * self.se_forecast, self.forecast + z * self.se_forecast

    def interval(self, level: float = 0.95, *, z: float | None = None) -> tuple[float, float]:
        """The forecast's interval over E (U fixed) at coverage ``level``: the hull of the Student-t and
        the bootstrap-t intervals of the s_n (``statistics.skew_aware_interval``).

        Skew-aware: the normal interval ``delta_h1 -+ 1.96 se_cond_e`` covered 0.87 on skewed s_n at
        B_E = 32 (docs/validation.md has what this one covers). ``z=``: the old normal
        interval ``delta_h1 -+ z * se_cond_e`` (e.g. ``z=Z95``).
        """
        if z is not None:
            return self.delta_h1 - z * self.se_cond_e, self.delta_h1 + z * self.se_cond_e
        if not 0 < level < 1:
            raise ValueError(
                f"interval: level must lie in (0, 1), got {level!r} (for a normal interval with "
                "a z multiplier pass z=...)"
            )
        return skew_aware_interval(self.per_unit, self.lr, level)

    def to_dict(self) -> dict:
        keys = (
            "delta_h1",
            "se_cond_e",
            "var_cond_e",
            "se_jackknife",
            "se_total",
            "var_update",
            "entropy",
            "n_eval_units",
            "n_update_units",
            "lr",
            "n_dropped_rows",
            "interval_method",
            "reliable",
        )
        out = {f"{PREFIX}{k}": getattr(self, k) for k in keys}
        out[f"{PREFIX}interval_lo95"], out[f"{PREFIX}interval_hi95"] = self.interval(0.95)
        if self.forecast is not None:
            out.update(
                {
                    f"{PREFIX}{k}": getattr(self, k)
                    for k in ("delta_h2", "se_delta_h2", "forecast", "se_forecast")
                }
            )
        for name, (value, se) in (self.by_group or {}).items():
            out[f"{PREFIX}group/{name}"], out[f"{PREFIX}group/{name}/se"] = value, se
        if self.truth is not None:
            out.update(self.truth.to_dict())
        return out
