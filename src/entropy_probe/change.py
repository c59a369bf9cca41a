"""The entropy change the real step caused, measured on the forecast's own E (DESIGN section 11).

``probe.run(...)`` keeps, for its E units, the batch and the log-probs ``S_i, S_w,i`` at theta from
its forecast pass (``EvalState``, on the result; never in ``to_dict``). After the trainer's real
``optimizer.step()`` one forward over the same E at the new parameters gives ``S_i(theta')``, and
the change is the truth's self-normalised importance-sampling estimate (``truth.entropy_change``):
same definitions of ``delta_h``, its jackknife ``se``, the ``ess`` and ``se_diff`` (SE of measured
minus forecast on the same E). No parameter is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from .batch import RolloutBatch
from .result import PREFIX
from .truth import _check_weights, entropy_change, logprobs_at


@dataclass
class EvalState:
    """What ``measure_change`` needs from the forecast pass: this rank's E (None if it holds no E unit)
    and ``(N,)`` fp32 ``S_i`` and ``S_w,i`` at the parameters the forecast was made at."""

    batch: RolloutBatch | None
    seq: Tensor | None
    weighted: Tensor | None


@dataclass
class MeasuredChange:
    """The entropy change on E between the forecast's parameters and the current ones."""

    delta_h: float
    """measured change (nats), self-normalised importance sampling"""
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
    params: dict[str, nn.Parameter],
    state: EvalState,
    per_unit: Tensor,
    lr: float,
    *,
    temperature: float,
    weighting: str,
    microbatch_units: int,
    comm=None,
) -> MeasuredChange:
    """One forward over ``state.batch`` at the live parameters; the change against ``state``'s log-probs."""
    seq1 = w1 = None
    if state.batch is not None:
        seq1, w1 = logprobs_at(
            module,
            dict(params),
            state.batch,
            temperature=temperature,
            weighting=weighting,
            microbatch_units=microbatch_units,
        )
        _check_weights(state.seq, seq1, 1.0)
    delta, se, ess, se_diff = entropy_change(
        state.batch, state.seq, state.weighted, seq1, w1, per_unit, lr, comm=comm
    )
    return MeasuredChange(delta_h=delta, se=se, ess=ess, se_diff=se_diff)
