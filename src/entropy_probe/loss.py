"""The policy loss ``-J_U`` that the probe's update direction assumes your optimizer minimises.

Train with this loss (or one equal to it) and the forecast is of your real step: same advantages,
same loss aggregation, same temperature as the ``ProbeConfig``. At importance ratio 1 (the first
PPO/GRPO epoch on fresh samples) it has the gradient of the clipped surrogate.

>>> import torch, entropy_probe as ep
>>> from entropy_probe.toy import TabularPolicy, sample_enumerated
>>> policy, config = TabularPolicy(seed=0), ep.ProbeConfig(lr=0.1, direction="sgd")
>>> U = sample_enumerated(policy, n_units=4, seed=1)
>>> v = ep.EntropyProbe(policy, config=config).update_direction(U)       # ascent direction
>>> g, = torch.autograd.grad(ep.policy_loss(policy, U, config), [policy.table])
>>> torch.allclose(v["table"], -g, atol=1e-6)                             # sgd: v = -grad loss
True
"""

from __future__ import annotations

from torch import Tensor, nn

from .batch import RolloutBatch
from .config import ProbeConfig
from .logprobs import policy_logprobs
from .objectives import UpdateTotals, advantages, policy_gradient_coefficients, update_surrogate


def policy_loss(model: nn.Module, batch: RolloutBatch, config: ProbeConfig) -> Tensor:
    """``-J_U = -mean_m J_m``, ``J_m = sum_{i in m} c_i S_i``, differentiable in the model's parameters.

    Single process: ``batch`` is the whole update batch (the aggregation's normalisers are its own).
    """
    adv = advantages(batch, config.advantage_estimator)
    coeff = policy_gradient_coefficients(
        batch, adv, config.loss_aggregation, UpdateTotals.of(batch), config.norm_length
    )
    seq = policy_logprobs(model, batch, config).seq
    return -update_surrogate(seq, coeff) / batch.n_units
