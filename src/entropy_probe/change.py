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

from torch import Tensor, nn

from .batch import RolloutBatch
from .config import ProbeConfig
from .engines import uses_token_pieces
from .fsdp import is_sharded, logprobs_lockstep, response_tokens_lockstep
from .logprobs import SequenceLogProbs
from .response_tokens import ResponseTokens, response_tokens_at
from .result import PREFIX
from .token_truth import token_change
from .truth import _check_weights, entropy_change, logprobs_at
from .vectors import Params


@dataclass
class EvalState:
    """What ``measure_change`` needs from the forecast pass: this rank's E (None if it holds no E unit)
    and, at the parameters the forecast was made at, its ``S_i``, ``S_w,i`` (the sequence functionals) or
    its per-token log-probs and entropies (``ResponseTokens``: the token-level entropy)."""

    batch: RolloutBatch | None
    before: SequenceLogProbs | ResponseTokens | None


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


def measure_change(
    module: nn.Module,
    params: Params,
    state: EvalState,
    per_unit: Tensor,
    lr: float,
    cfg: ProbeConfig,
    comm=None,
) -> MeasuredChange:
    """One forward over ``state.batch`` at the live parameters; the change against ``state``'s log-probs.

    The functional is the one the forecast measured: the token-level entropy when ``state`` holds
    ``ResponseTokens`` (``token_truth.token_change``), else the sequence functional."""
    if isinstance(state.before, ResponseTokens) or (state.batch is None and uses_token_pieces(cfg)):
        return _measure_token_change(module, params, state, per_unit, lr, cfg, comm)
    after = None
    if state.batch is not None:
        sharded = is_sharded(params)  # FSDP2: forwards are collectives, every rank runs every rank's E
        after = (
            logprobs_lockstep(module, state.batch, cfg)
            if sharded
            else logprobs_at(module, dict(params), state.batch, cfg)
        )
        _check_weights(state.before.seq, after.seq, 1.0)
    change = entropy_change(state.batch, state.before, after, per_unit, lr, comm=comm)
    return MeasuredChange(delta_h=change.delta_h, se=change.se, ess=change.ess, se_diff=change.se_diff)


def _measure_token_change(
    module: nn.Module, params: Params, state: EvalState, per_unit: Tensor, lr: float, cfg: ProbeConfig, comm
) -> MeasuredChange:
    after = None
    if state.batch is not None:
        after = (
            response_tokens_lockstep(module, state.batch, cfg)
            if is_sharded(params)
            else response_tokens_at(module, dict(params), state.batch, cfg.temperature, cfg.microbatch_units)
        )
        _check_weights(state.before.seq, after.seq, 1.0)
    change = token_change(
        state.batch, state.before, after, per_unit, lr, comm=comm, ratio=cfg.entropy == "token"
    )
    return MeasuredChange(delta_h=change.delta_h, se=change.se, ess=change.ess, se_diff=change.se_diff)
