"""The entropy change the real step caused, measured on the forecast's own E (docs/design.md section 10).

``probe.run(...)`` keeps, for its E units, the batch and the log-probs ``S_i, S_w,i`` at theta from
its forecast pass (``EvalState``, on the result; never in ``to_dict``). After the trainer's real
``optimizer.step()`` one forward over the same E at the new parameters gives ``S_i(theta')``, and
the change is the truth's importance-weighted estimate (``truth.entropy_change``): same definitions
of ``delta_h``, its ``se`` over E units, the ``ess`` and ``se_diff`` (SE of measured minus forecast on
the same E). No parameter is copied.

A measurement is only meaningful against the forecast it was kept for: ``check_eval_state`` refuses
(``ValueError``) a result made for another model (another module object: its log-probs at theta are
another policy's, and with no step taken the "change" would be the gap between two models), for an E
that has changed since (a checksum of its tensors), or at another temperature or entropy functional
than this probe's config. And as for the truth, a change whose importance weights collapse (ESS below
``truth.ess_threshold``) is flagged ``reliable = False`` with a ``RuntimeWarning``: a step that moved
the policy so far that a few E sequences carry all the weight measures nothing.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batch import RolloutBatch
from .config import ProbeConfig
from .context import ProbeCall
from .engines import uses_token_pieces
from .logprobs import SequenceLogProbs
from .response_tokens import ResponseTokens
from .result import PREFIX, EvalState
from .token_truth import token_change
from .truth import _check_weights, entropy_change, step_too_large
from .vectors import device_of

__all__ = ["EvalState", "MeasuredChange", "check_eval_state", "eval_state", "measure_change"]


# The config fields that define the entropy functional the log-probs were kept for ("entropy" is the
# token/sequence choice where the config has it).
FUNCTIONAL_FIELDS = ("temperature", "entropy_weighting", "entropy")

# A number per module for the life of the process: a result keeps the number, never the module.
_MODEL_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEXT_KEY = itertools.count(1)


def model_key(module: nn.Module) -> int:
    """The number that names ``module`` (the unwrapped model) in the results made for it."""
    key = _MODEL_KEYS.get(module)
    if key is None:
        key = _MODEL_KEYS[module] = next(_NEXT_KEY)
    return key


def functional_of(cfg: ProbeConfig) -> dict:
    """``{field: value}`` of the config fields that define the measured entropy functional."""
    return {name: getattr(cfg, name, None) for name in FUNCTIONAL_FIELDS}


def batch_digest(batch: RolloutBatch | None) -> tuple | None:
    """Shapes and position-weighted float64 sums of E's tensors: changes when E is replaced or edited."""
    if batch is None:
        return None
    tensors = (batch.input_ids, batch.attention_mask, batch.response_mask, batch.group_ids)
    sums = []
    for t in tensors:
        flat = t.reshape(-1).double()  # (numel,)
        sums += [flat.sum(), (flat * torch.arange(1, flat.numel() + 1, device=flat.device).double()).sum()]
    return tuple(tuple(t.shape) for t in tensors) + tuple(torch.stack(sums).tolist())  # one host sync


def eval_state(
    module: nn.Module, batch: RolloutBatch | None, before: SequenceLogProbs, cfg: ProbeConfig
) -> EvalState:
    """The state of a forecast pass of ``module`` (unwrapped) over ``batch`` under ``cfg``."""
    return EvalState(batch, before, model_key(module), functional_of(cfg), batch_digest(batch))


def check_eval_state(module: nn.Module, state: EvalState, cfg: ProbeConfig) -> None:
    """ValueError unless ``state`` was kept for this model, this functional and the E it still holds."""
    if state.model is not None and state.model != model_key(module):
        raise ValueError(
            "measure_change: the result was made for another model; measure it with the probe of the "
            "model it forecast (its log-probs at theta belong to that model)"
        )
    for name, value in (state.functional or {}).items():
        if getattr(cfg, name, None) != value:
            raise ValueError(
                f"measure_change: the result was made with ProbeConfig.{name}={value!r}, this probe has "
                f"{getattr(cfg, name, None)!r}; a change of another functional is not this forecast's"
            )
    if state.digest is not None and batch_digest(state.batch) != state.digest:
        raise ValueError(
            "measure_change: the result's eval batch has changed since the forecast (its tensors were "
            "edited or replaced); the kept log-probs are those of another E"
        )


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
    reliable: bool = True
    """False when the importance weights collapsed (ESS below ``truth.ess_threshold``), as for the truth"""

    def to_dict(self) -> dict:
        keys = ("delta_h", "se", "ess", "se_diff", "reliable")
        return {f"{PREFIX}measured/{k}": getattr(self, k) for k in keys}


def measure_change(call: ProbeCall, state: EvalState, per_unit: Tensor, lr: float) -> MeasuredChange:
    """One forward over ``state.batch`` at the live parameters (the call's passes: under FSDP2 every
    rank runs every rank's E); the change against ``state``'s log-probs, ``se_diff`` against
    ``lr * per_unit``. The caller checks the state first (``check_eval_state``, before any collective).
    The functional is the one the forecast measured: the token-level entropy (or the sequence "sum"
    numerator) when ``state`` holds per-token terms (``token_truth.token_change``)."""
    if isinstance(state.before, ResponseTokens) or (state.batch is None and uses_token_pieces(call.config)):
        return _measure_token_change(call, state, per_unit, lr)
    after = None
    if state.batch is not None:
        where = "measure_change (the real step, on the forecast's E)"
        with step_too_large(where, f"the optimizer's step; the forecast was made at lr {lr:g}"):
            after = call.passes.logprobs(call.module, call.params, state.batch, call.config)
        _check_weights(state.before.seq, after.seq, where)
    change = entropy_change(state.batch, state.before, after, per_unit, lr, comm=call.comm)
    return _measured(change)


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
    return _measured(change)


def _measured(change) -> MeasuredChange:
    """The change as measured, with a warning when its importance weights collapsed (the truth's rule)."""
    if not change.reliable:
        warnings.warn(
            f"measure_change: degenerate importance weights (ESS {change.ess:.3g}, below 10% of the E "
            "sequences or below min(8, N/2)): the step moved the policy so far that a few E sequences "
            "carry all the weight; the measured change is unreliable (reliable = False). Measure it on "
            "fresh samples.",
            RuntimeWarning,
            stacklevel=4,
        )
    return MeasuredChange(change.delta_h, change.se, change.ess, change.se_diff, change.reliable)
