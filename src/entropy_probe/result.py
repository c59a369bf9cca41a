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
interval_method     how ``interval()`` is built: "hull(student-t, bootstrap-t)" (docs/design.md section 6)
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

Only numbers and booleans: a value that is None (se_total without U) is left out, and the string
``interval_method`` stays on the result (a logger that averages every metric, as verl's does, would
break on a string).

The result is composed of the parts a call builds: ``first`` (``FirstOrder``), ``update``
(``UpdateVariance``, None without U), ``second`` (``SecondOrderForecast``, None without second order),
``by_group``, ``truth``, and the ``lookahead`` and ``prediction`` slots. Every flat name above is a
read-only property reading its part (``result.delta_h1 is result.first.delta_h1``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from statistics import NormalDist
from typing import Any

from torch import Tensor

from .batch import RolloutBatch
from .logprobs import SequenceLogProbs
from .response_tokens import ResponseTokens
from .statistics import skew_aware_interval

INTERVAL_METHOD = "hull(student-t, bootstrap-t)"

PREFIX = "entropy_probe/"


@dataclass
class TruthResult:
    """The measured entropy change of ``theta + alpha * eta * v`` (docs/design.md section 10)."""

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
class EvalState:
    """What ``measure_change`` needs from the forecast pass: this rank's E (None if it holds no E unit)
    and, at the parameters the forecast was made at, its ``S_i``, ``S_w,i`` or, when E was read through the
    exact H_t, its per-token terms (``response_tokens.ResponseTokens``), never in ``to_dict``; and
    what they were made for (``change.check_eval_state``): the model's ``change.model_key``, the
    entropy functional and E's ``change.batch_digest``."""

    batch: RolloutBatch | None
    before: SequenceLogProbs | ResponseTokens | None
    model: int | None = None
    functional: dict | None = None
    digest: tuple | None = None


@dataclass
class FirstOrder:
    """The first-order forecast over E with U fixed (``result.first``)."""

    delta_h1: float
    se_cond_e: float
    var_cond_e: float
    se_jackknife: float
    entropy: float
    n_eval_units: int
    lr: float
    per_unit: Tensor  # (B_E,) float64 s_n, in eval-unit order: unit n contributes lr * s_n / B_E
    eval_unit_ids: Tensor  # (B_E,) group id of each eval unit
    n_dropped_rows: int = 0  # E rows with no response token, dropped from their units (summed over ranks)

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


@dataclass
class UpdateVariance:
    """What U adds (``result.update``; None when the direction was given or came from ``.grad``).

    The variance fields are None with ``ProbeConfig(unconditional_se=False)``."""

    n_update_units: int = 0  # B_U
    se_total: float | None = None  # sqrt(var_cond_e + max(var_update, 0))
    var_update: float | None = None  # V_U: se_total ** 2 = var_cond_e + var_update
    update_influence: Tensor | None = None  # (B_U,) float64 per U unit (update_jackknife)
    update_unit_ids: Tensor | None = None  # (B_U,) group id of each U unit, the order of update_influence


@dataclass
class SecondOrderForecast:
    """The second-order term and the forecast (``result.second``; None without ``second_order``)."""

    delta_h2: float  # (eta^2/2) mean_n q_n
    se_delta_h2: float  # (eta^2/2) sqrt(var(q) / B_E)
    forecast: float  # delta_h1 + delta_h2
    se_forecast: float  # sqrt(var(eta s_n + eta^2/2 q_n) / B_E)
    per_unit_q: Tensor | None = None  # (B_E,) float64 q_n, eval-unit order: unit n adds eta^2/2 q_n / B_E

    def forecast_interval(self, level: float = 0.95) -> tuple[float, float]:
        """Normal interval of ``forecast`` over E, ``forecast -+ z * se_forecast``."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"forecast_interval: level must be in (0, 1), got {level!r}")
        z = NormalDist().inv_cdf(0.5 + level / 2)
        return self.forecast - z * self.se_forecast, self.forecast + z * self.se_forecast


FIRST_NAMES = tuple(f.name for f in fields(FirstOrder))
UPDATE_NAMES = tuple(f.name for f in fields(UpdateVariance))
SECOND_NAMES = tuple(f.name for f in fields(SecondOrderForecast))


def _part(cls, part, flat: dict, names: tuple[str, ...]):
    """``part`` with the flat values among ``names`` written over it; a missing part is built from them
    when one of them carries a value (``None`` and ``n_update_units=0`` carry none)."""
    given = {k: flat[k] for k in names if k in flat}
    if part is not None:
        return replace(part, **given)
    if not any(v is not None and not (k == "n_update_units" and v == 0) for k, v in given.items()):
        return None
    return cls(**{k: None for k in names if k not in given and cls is SecondOrderForecast}, **given)


@dataclass(init=False)
class ProbeResult:
    """The forecast of one optimizer step's entropy change, with its uncertainty: the parts a call builds.

    Built from its parts, ``ProbeResult(first=FirstOrder(...), update=..., second=...)``, or from the
    flat names of ``to_dict`` (``ProbeResult(delta_h1=..., se_cond_e=..., ...)``); a flat name given
    with the parts is written over its part, so ``dataclasses.replace(result, lr=...)`` works too.
    """

    first: FirstOrder
    update: UpdateVariance | None = None
    second: SecondOrderForecast | None = None
    by_group: dict[str, tuple[float, float]] | None = None  # {group: (delta_h1_g, se_g)}, summing to delta_h1
    truth: TruthResult | None = None
    lookahead: TruthResult | None = (
        None  # the step applied on E before it is taken (docs/design.md section 17)
    )
    prediction: Any | None = None  # lookahead.Prediction: the number to use (value, se, method, reliable)
    eval_state: EvalState | None = field(default=None, repr=False, compare=False)  # for measure_change
    interval_method: str = INTERVAL_METHOD
    caveats: tuple[str, ...] = ()
    """Why a number may be wrong although it was computed: the direction rule is not the optimizer's step
    (from_grad), or the E units are identical (SE 0 from B_E > 1 units). Any caveat makes ``reliable``
    False, as does the large-step diagnostic."""
    halves: Any | None = field(default=None, repr=False, compare=False)
    """``update_jackknife.EvalHalves`` with ``ProbeConfig(keep_halves=True)``: Xbar_A, Xbar_B (steering)"""

    def __init__(
        self,
        first: FirstOrder | None = None,
        update: UpdateVariance | None = None,
        second: SecondOrderForecast | None = None,
        by_group: dict[str, tuple[float, float]] | None = None,
        truth: TruthResult | None = None,
        lookahead: Any | None = None,
        prediction: Any | None = None,
        eval_state: EvalState | None = None,
        interval_method: str = INTERVAL_METHOD,
        caveats: tuple[str, ...] = (),
        halves: Any | None = None,
        **flat,
    ):
        unknown = sorted(set(flat) - set(FIRST_NAMES + UPDATE_NAMES + SECOND_NAMES))
        if unknown:
            raise TypeError(f"ProbeResult: unexpected argument(s) {unknown}")
        self.first = _part(FirstOrder, first, flat, FIRST_NAMES)
        if self.first is None:
            raise TypeError("ProbeResult: needs first=FirstOrder(...) or its flat fields")
        self.update = _part(UpdateVariance, update, flat, UPDATE_NAMES)
        self.second = _part(SecondOrderForecast, second, flat, SECOND_NAMES)
        self.by_group, self.truth = by_group, truth
        self.lookahead, self.prediction = lookahead, prediction
        self.eval_state, self.interval_method = eval_state, interval_method
        self.caveats = tuple(caveats)
        self.eval_state, self.interval_method, self.halves = eval_state, interval_method, halves

    def interval(self, level: float = 0.95, *, z: float | None = None) -> tuple[float, float]:
        """``first.interval``: the skew-aware interval of delta_h1 over E (U fixed)."""
        return self.first.interval(level, z=z)

    def forecast_interval(self, level: float = 0.95) -> tuple[float, float]:
        """``second.forecast_interval``: the normal interval of ``forecast``; needs second_order."""
        if self.second is None:
            raise ValueError(
                "forecast_interval: no second-order term in this result; run with "
                "ProbeConfig(second_order=True)"
            )
        return self.second.forecast_interval(level)

    @property
    def reliable(self) -> bool:
        """False when the probe knows a number may be wrong: a caveat (``caveats``), or the before-the-step
        diagnostic says the Taylor forecast cannot be trusted at this step size
        (``lookahead.StepDiagnostic``); a result built without the diagnostic counts as Taylor-reliable."""
        taylor = True if self.prediction is None else bool(self.prediction.taylor_reliable)
        return taylor and not self.caveats

    def prediction_interval(self, level: float = 0.95) -> tuple[float, float]:
        """The interval of ``prediction`` at ``level``: the skew-aware ``interval`` for the first order,
        ``forecast_interval`` for the second, the normal interval of the lookahead."""
        method = "first-order" if self.prediction is None else self.prediction.method
        if method == "first-order":
            return self.interval(level)
        if method == "second-order":
            return self.forecast_interval(level)
        return self.prediction.normal_interval(level)

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
            "reliable",
        )
        out = {f"{PREFIX}{k}": getattr(self, k) for k in keys}
        out[f"{PREFIX}interval_lo95"], out[f"{PREFIX}interval_hi95"] = self.interval(0.95)
        if self.second is not None:
            out.update({f"{PREFIX}{k}": getattr(self.second, k) for k in SECOND_NAMES if k != "per_unit_q"})
        for name, (value, se) in (self.by_group or {}).items():
            out[f"{PREFIX}group/{name}"], out[f"{PREFIX}group/{name}/se"] = value, se
        if self.truth is not None:
            out.update(self.truth.to_dict())
        if self.lookahead is not None:
            keys = ("delta_h", "se", "ess", "se_diff", "reliable")
            out.update({f"{PREFIX}lookahead/{k}": getattr(self.lookahead, k) for k in keys})
        if self.prediction is not None:
            out.update(self.prediction.to_dict())
        return {k: v for k, v in out.items() if v is not None}  # numbers and booleans only


def _flat(part: str, name: str, empty=None) -> property:
    def get(self):
        p = getattr(self, part)
        return empty if p is None else getattr(p, name)

    return property(get, doc=f"``result.{part}.{name}`` (read-only)")


for _name in FIRST_NAMES:
    setattr(ProbeResult, _name, _flat("first", _name))
for _name in UPDATE_NAMES:
    setattr(ProbeResult, _name, _flat("update", _name, 0 if _name == "n_update_units" else None))
for _name in SECOND_NAMES:
    setattr(ProbeResult, _name, _flat("second", _name))
del _name
