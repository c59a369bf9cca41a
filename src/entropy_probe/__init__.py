"""entropy-probe: forecast, before an RL optimizer step, how much policy entropy it will remove.

Public API (docs/design.md section 14)::

    import entropy_probe as ep
    batch = ep.RolloutBatch(input_ids, attention_mask, response_mask, group_ids, rewards=...)
    probe = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(...))
    result = probe.run(update_batch, eval_batch, truth=False)
"""

from .batch import RolloutBatch
from .config import ProbeConfig
from .control import ControlDecision, EntropyController
from .guard import EntropyGuard, GuardDecision
from .loss import policy_loss
from .probe import EntropyProbe
from .result import ProbeResult, TruthResult

__all__ = [
    "RolloutBatch",
    "ProbeConfig",
    "EntropyProbe",
    "ProbeResult",
    "TruthResult",
    "policy_loss",
    "EntropyGuard",
    "GuardDecision",
    "EntropyController",
    "ControlDecision",
]
__version__ = "0.1.0"
