"""The entropy change the real step caused, measured on the forecast's own E (DESIGN section 11).

``probe.run(...)`` keeps, for its E units, the batch and the log-probs ``S_i, S_w,i`` at theta from
its forecast pass (``EvalState``, on the result; never in ``to_dict``). After the trainer's real
``optimizer.step()`` one forward over the same E at the new parameters gives ``S_i(theta')``, and
the change is the truth's importance-weighted estimate (``truth.entropy_change``): same definitions
of ``delta_h``, its ``se`` over E units, the ``ess`` and ``se_diff`` (SE of measured minus forecast on
the same E). No parameter is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .context import ProbeCall
from .engines import uses_token_pieces
from .response_tokens import ResponseTokens
from .result import PREFIX, EvalState
from .token_truth import token_change
from .truth import _check_weights, entropy_change, step_too_large
from .vectors import device_of

__all__ = ["EvalState", "MeasuredChange", "measure_change"]


@dataclass
class MeasuredChange:
    """The entropy change on E between the forecast's parameters and the current ones."""

    delta_h: float
    """measured change (nats), importance-weighted on E (``truth.entropy_change``)"""
    se: float
    """its delete-one-unit jackknife SE over E"""
    ess: float
    """effective sample size of the importance weights"""
    se_diff: float
    """jackknife SE of ``delta_h - delta_h1`` on the same E"""

    def to_dict(self) -> dict:
        return {f"{PREFIX}measured/{k}": getattr(self, k) for k in ("delta_h", "se", "ess", "se_diff")}


def measure_change(call: ProbeCall, state: EvalState, per_unit: Tensor, lr: float) -> MeasuredChange:
    """One forward over ``state.batch`` at the live parameters (the call's passes: under FSDP2 every
    rank runs every rank's E); the change against ``state``'s log-probs, ``se_diff`` against
    ``lr * per_unit``. The functional is the one the forecast measured: the token-level entropy (or the
    sequence "sum" numerator) when ``state`` holds per-token terms (``token_truth.token_change``)."""
    if isinstance(state.before, ResponseTokens) or (state.batch is None and uses_token_pieces(call.config)):
        return _measure_token_change(call, state, per_unit, lr)
    after = None
    if state.batch is not None:
        where = "measure_change (the real step, on the forecast's E)"
        with step_too_large(where, f"the optimizer's step; the forecast was made at lr {lr:g}"):
            after = call.passes.logprobs(call.module, call.params, state.batch, call.config)
        _check_weights(state.before.seq, after.seq, where)
    change = entropy_change(state.batch, state.before, after, per_unit, lr, comm=call.comm)
    return MeasuredChange(delta_h=change.delta_h, se=change.se, ess=change.ess, se_diff=change.se_diff)


def _measure_token_change(call: ProbeCall, state: EvalState, per_unit: Tensor, lr: float) -> MeasuredChange:
    after = None
    if state.batch is not None:
        where = "measure_change (the real step, on the forecast's E)"
        with step_too_large(where, f"the optimizer's step; the forecast was made at lr {lr:g}"):
            after = call.passes.tokens(call.module, call.params, state.batch, call.config)
        _check_weights(state.before.seq, after.seq, where)
    ratio = call.config.entropy == "token"
    device = device_of(call.params)
    change = token_change(state.batch, state.before, after, per_unit, lr, call.comm, ratio, device)
    return MeasuredChange(delta_h=change.delta_h, se=change.se, ess=change.ess, se_diff=change.se_diff)
