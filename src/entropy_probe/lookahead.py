"""Large steps (docs/design.md section 17): a forecast that is right, or says before the step that it
cannot be.

The Taylor forecast (``delta_h1``, ``forecast``) expands the entropy after ``theta + eta v`` around
theta. How far the step moves the policy on E is what decides whether that expansion holds: every E
sequence's log-prob moves by ``l_i = eta dS_i`` to first order, and the step reweights E by
``exp(l_i)``. The diagnostic is the effective sample size of those predicted weights, as a fraction of
the N E sequences,

    rho = (sum_i exp(l_i))^2 / (N sum_i exp(2 l_i))          (1 when the step moves nothing)

and the forecast is ``reliable`` when ``rho >= RELIABLE_ESS_FRACTION`` (0.85; a log-normal spread of
``l`` with SD s has ``rho = exp(-s^2)``, so 0.85 is an SD of 0.4 nats). With the second order on, its
term must also be small against the first, ``|delta_h2| <= SERIES_RATIO |delta_h1|`` (1/2), for the
second-order forecast to be the prediction; else the series is used outside its radius (on a GPT-2 at
its own init, lr 3e-3: a second-order forecast of -0.045 for an exact -0.025, 1.2 of its SEs away, while
the first order covered) and the prediction is the first-order forecast. Where the E pass ran in
forward mode (``engine="jvp"``) it has computed every dS_i exactly and ``l_i = eta dS_i`` is read from it:
no forward is added. Otherwise (the backward engine's reverse passes give sums over a unit, not the dS_i)
the l_i come from one forward at a small fraction of the step, ``l_i = (S_i(theta + a eta v) - S_i(theta))
/ a`` with ``a = DIAGNOSTIC_ALPHA``, through the truth's own stepped forward (functional, or in place and
undone under FSDP2; fp32 for bf16 models): the finite difference is the derivative to O(a eta^2 d2S),
which moves rho by a few percent where the rule decides. ``rho`` at scale c is ``rho`` of ``c l``: the guard
reads it without another forward. Why this rule and its figures: docs/large_steps.md.

The lookahead is the truth at alpha = 1 (``truth.entropy_change`` of the stepped forward): the step
applied on E before it is taken, unbiased at any step size, with its own ``reliable`` (the truth's ESS
rule on the real weights). ``Prediction`` is the number a consumer should use: the Taylor forecast
when it is reliable, else the lookahead when computed, flagged ``reliable = False`` when neither holds.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
from torch import Tensor

from .context import ProbeCall
from .engines import uses_token_pieces
from .logprobs import SequenceLogProbs
from .result import PREFIX, TruthResult
from .token_truth import measure_token_truth
from .truth import _check_weights, entropy_change, full_precision_state
from .vectors import Vector, device_of

RELIABLE_ESS_FRACTION = 0.85
SERIES_RATIO = 0.5  # the second-order forecast is the prediction when |delta_h2| <= this x |delta_h1|
DIAGNOSTIC_ALPHA = 1.0 / 16.0
METHODS = ("first-order", "second-order", "lookahead")
METHOD_IDS = {m: i for i, m in enumerate(METHODS, start=1)}  # to_dict holds numbers only


def ess_fraction(log_ratios: Tensor, scale: float = 1.0) -> float:
    """``(sum w)^2 / (N sum w^2)`` of ``w = exp(scale * l)`` over all N sequences (float64, overflow-safe)."""
    x = scale * log_ratios.double()
    if x.numel() == 0:
        return 1.0
    w = torch.exp(x - x.max())  # (N,) the ESS does not change when every weight is divided by one number
    return float(w.sum() ** 2 / (w * w).sum()) / x.numel()


@dataclass
class StepDiagnostic:
    """The before-the-step diagnostic: the predicted first-order log-ratios of every E sequence."""

    log_ratios: Tensor  # (N,) float64 l_i = eta dS_i, every rank's E rows in rank order
    ess_fraction: float  # rho of the full step
    reliable: bool  # rho >= RELIABLE_ESS_FRACTION

    @classmethod
    def of(cls, log_ratios: Tensor) -> "StepDiagnostic":
        rho = ess_fraction(log_ratios)
        return cls(log_ratios.double().cpu(), rho, rho >= RELIABLE_ESS_FRACTION)

    @property
    def log_ratio_sd(self) -> float:
        return float(self.log_ratios.std()) if self.log_ratios.numel() > 1 else 0.0

    def max_reliable_scale(self) -> float:
        """The largest c in (0, 1] where the diagnostic holds: ``rho(c l) >= RELIABLE_ESS_FRACTION`` (rho
        falls as c grows)."""
        if ess_fraction(self.log_ratios, 1.0) >= RELIABLE_ESS_FRACTION:
            return 1.0
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ess_fraction(self.log_ratios, mid) >= RELIABLE_ESS_FRACTION else (lo, mid)
        return lo


class SteppedEval:
    """Entropy changes on E at ``theta + c eta v`` for any scale c, one forward each through the call's
    passes (functional, each stepped parameter formed where the forward reads it, ``stepped``; in place
    and undone bit-exactly under FSDP2), the live model untouched. The log-probs at theta are evaluated
    once, through the same forward, so that the weights are exactly 1 at c = 0. Holds v until dropped
    (from ``from_grad``, a ``StepView``: no parameter-sized tensor); under DDP/FSDP2 every rank calls
    ``at`` with the same c."""

    def __init__(self, call: ProbeCall, v: Vector, batch):
        self.call, self.v, self.batch = call, v, batch
        in_place = call.passes.steps_in_place
        self.base = None
        if batch is not None and not in_place:  # a bf16/fp16 model is stepped and evaluated in fp32
            self.base = full_precision_state(call.module, call.params)
        self._before: SequenceLogProbs | None = None

    def logprobs(self, step: float) -> SequenceLogProbs:
        """S_i, S_w,i of this rank's E at ``theta + step v`` (the caller skips a rank without E units)."""
        c = self.call
        with torch.autocast(device_of(c.params).type, enabled=False):  # theta' must not be rounded
            return c.passes.logprobs_stepped(
                c.module, c.params, self.batch, c.config, self.v, step, self.base
            )

    @property
    def before(self) -> SequenceLogProbs | None:
        if self._before is None and self.batch is not None:
            self._before = self.logprobs(0.0)
        return self._before

    def log_ratios(self, kept: Tensor | None = None, alpha: float = DIAGNOSTIC_ALPHA) -> Tensor:
        """``(N,)`` float64 ``(S_i(theta + alpha eta v) - S_i(theta)) / alpha``, gathered over ranks.

        ``kept``: this rank's S_i at theta from the E pass, used instead of another forward when the
        model is evaluated as the E pass evaluated it (fp32, one process or DDP); their microbatching
        differs from this forward's by float rounding (~1e-7 nats), ~1e-6 of l_i at alpha = 1/16."""
        local = torch.zeros(0, dtype=torch.float64, device=device_of(self.call.params))
        if self.batch is not None:
            after = self.logprobs(alpha * self.call.lr)
            reuse = kept is not None and self.base is None and not self.call.passes.steps_in_place
            before = kept if reuse else self.before.seq
            local = (after.seq.double() - before.double()) / alpha  # (N_local,)
        return self.call.comm.gather(local)

    def at(self, scale: float, per_unit: Tensor | None = None):
        """``truth.Change`` of the step at ``scale * eta``; ``per_unit`` the s_n (for its se_diff)."""
        after = None
        if self.batch is not None:
            after = self.logprobs(scale * self.call.lr)
            _check_weights(self.before.seq, after.seq, scale)
        pred = None if per_unit is None else per_unit * scale
        return entropy_change(self.batch, self.before, after, pred, self.call.lr, comm=self.call.comm)


def lookahead_result(stepped: SteppedEval, per_unit: Tensor) -> TruthResult:
    """The lookahead: the truth at alpha = 1 from ``stepped`` (no warning here: the caller says it)."""
    c = stepped.at(1.0, per_unit)
    return TruthResult(
        delta_h=c.delta_h,
        se=c.se,
        ess=c.ess,
        se_diff=c.se_diff,
        alphas=[1.0],
        delta_h_at=[c.delta_h],
        se_at=[c.se],
        ess_at=[c.ess],
        se_diff_at=[c.se_diff],
        slope=c.delta_h,
        reliable=c.reliable,
    )


@dataclass(frozen=True)
class Prediction:
    """The entropy change a consumer should use for the step about to be taken (``result.prediction``)."""

    value: float
    """nats"""
    se: float
    """its SE over E"""
    method: str
    """"first-order", "second-order" (the Taylor forecast) or "lookahead" (the step applied on E)"""
    reliable: bool
    """False when nothing is trustworthy: the Taylor diagnostic failed and there is no lookahead
    (``lookahead="never"``) or its own importance weights collapsed"""
    taylor_reliable: bool
    """the before-the-step diagnostic: ``ess_fraction >= RELIABLE_ESS_FRACTION`` (``result.reliable``)"""
    ess_fraction: float
    """rho, the predicted effective sample size of the step as a fraction of the E sequences"""
    diagnostic: StepDiagnostic | None = field(default=None, repr=False, compare=False)
    stepped: SteppedEval | None = field(default=None, repr=False, compare=False)
    """kept when the method is the lookahead, for the guard's trial scales (holds v; drop the result to
    free it)"""

    def normal_interval(self, level: float = 0.95) -> tuple[float, float]:
        if not 0.0 < level < 1.0:
            raise ValueError(f"prediction_interval: level must be in (0, 1), got {level!r}")
        z = NormalDist().inv_cdf(0.5 + level / 2)
        return self.value - z * self.se, self.value + z * self.se

    def to_dict(self) -> dict:
        """Numbers and booleans only: the method as ``prediction/method_id`` (``METHOD_IDS``)."""
        out = {f"{PREFIX}prediction/{k}": getattr(self, k) for k in ("value", "se", "reliable")}
        out[f"{PREFIX}prediction/method_id"] = METHOD_IDS[self.method]
        out[f"{PREFIX}step_ess_fraction"] = self.ess_fraction
        return out


def taylor_forecast(first, second) -> tuple[float, float, str]:
    """(value, se, method) of the Taylor forecast of a call: the second order when it was computed and its
    term is within ``SERIES_RATIO`` of the first (the series converging), else the first order."""
    if second is not None and abs(second.delta_h2) <= SERIES_RATIO * abs(first.delta_h1):
        return second.forecast, second.se_forecast, "second-order"
    return first.delta_h1, first.se_cond_e, "first-order"


def lookahead_of(call: ProbeCall, stepped: SteppedEval, per_unit: Tensor) -> TruthResult:
    """The lookahead of the functional the call forecasts: the sequence-level truth at alpha = 1 from
    ``stepped``, or, when E is read through the exact H_t, the token-level truth at alpha = 1 (its trial
    scales for the guard are not offered then: ``Prediction.stepped`` stays None)."""
    if not uses_token_pieces(call.config):
        return lookahead_result(stepped, per_unit)
    at_one = dataclasses.replace(call, config=dataclasses.replace(call.config, truth_alphas=(1.0,)))
    return measure_token_truth(at_one, stepped.v, stepped.batch, per_unit)


def large_step(
    call: ProbeCall,
    v: Vector,
    batch,
    kept_seq: Tensor | None,
    per_unit: Tensor,
    parts: tuple = (None, None),
    truth: TruthResult | None = None,
    d_seq: Tensor | None = None,
) -> tuple[TruthResult | None, Prediction]:
    """``(lookahead, prediction)`` of one call: the diagnostic (``kept_seq``: this rank's S_i from the E
    pass), the lookahead as ``call.config.lookahead`` asks ("auto": when the diagnostic fails), the
    prediction from ``parts`` = (the call's first-order part, its second-order part or None), the
    warnings. ``truth``: the call's own truth, reused as the lookahead when measured at alpha = 1 alone.
    ``d_seq``: this rank's exact dS_i when the E pass computed them (forward mode): the diagnostic is then
    ``l_i = eta dS_i`` itself, and its stepped forward is not run."""
    stepped = SteppedEval(call, v, batch)
    first, second = parts
    if call.lr == 0.0:  # no step: nothing moves, and no forward is needed to know it
        diagnostic = StepDiagnostic.of(torch.zeros(0, dtype=torch.float64))
    elif d_seq is not None:  # the derivative itself, where the finite difference approximates it
        diagnostic = StepDiagnostic.of(call.comm.gather(call.lr * d_seq.double()))
    else:
        diagnostic = StepDiagnostic.of(stepped.log_ratios(kept_seq))
    mode, look = call.config.lookahead, None
    if mode == "always" or (mode == "auto" and not diagnostic.reliable):
        reuse = truth is not None and list(truth.alphas) == [1.0]
        look = truth if reuse else lookahead_of(call, stepped, per_unit)
    value, se, method = taylor_forecast(first, second)
    trusted = diagnostic.reliable
    if look is not None and (look.reliable or not diagnostic.reliable):
        value, se, method, trusted = look.delta_h, look.se, "lookahead", look.reliable
    prediction = Prediction(
        value, se, method, trusted, diagnostic.reliable, diagnostic.ess_fraction, diagnostic,
        stepped if method == "lookahead" and not uses_token_pieces(call.config) else None,
    )  # fmt: skip
    _warn(diagnostic, look, prediction)
    return look, prediction


def _warn(diagnostic: StepDiagnostic, look: TruthResult | None, prediction: Prediction) -> None:
    if diagnostic.reliable:
        return
    where = (
        f"the step moves E's log-probs so far (predicted ESS {diagnostic.ess_fraction:.2f} of the E "
        f"sequences; reliable from {RELIABLE_ESS_FRACTION}) that the Taylor forecast cannot be trusted"
    )
    if not prediction.reliable:
        why = (
            "no lookahead (lookahead='never')"
            if look is None
            else f"the lookahead's own importance weights collapsed too (ESS {look.ess:.3g})"
        )
        msg = f"{where}, and {why}: nothing is trustworthy at this step size (result.reliable = False)"
    else:
        msg = f"{where} (result.reliable = False); the prediction is the lookahead, {prediction.value:+.4g}"
    warnings.warn(f"entropy probe: {msg}", RuntimeWarning, stacklevel=4)
