"""``direction="optimizer-copy"``: v is exactly the step of ANY ``torch.optim`` optimizer, taken by a copy.

The closed form of "optimizer-step" mirrors Adam/AdamW only. For every other optimizer (SGD with
momentum, weight decay or Nesterov, Adagrad, RMSprop, Adamax, NAdam, RAdam, ...) the step is taken by
a second optimizer of the same class, built over a detached copy of each parameter and given a copy
of its state; ``v = (theta_next - theta) / eta``. The live parameters, their
``.grad`` and the live optimizer's state are only read.

The copy is made one parameter at a time (every torch.optim rule but LBFGS is per parameter), so
the extra memory is v plus a few copies of the largest parameter. Measured
(``benchmarks/bench_optimizer_copy.py``, 8.4M parameters, warm AdamW, loaded 2-core CPU): 3.24 s
against 3.13 s for the closed form, peak extra memory 1.93x against 1.65x the fp32 parameter bytes.

>>> import torch
>>> from torch import nn
>>> w = nn.Parameter(torch.tensor([1.0, -2.0]))
>>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.5)
>>> v = copied_step({"w": torch.tensor([1.0, 1.0])}, {"w": w}, opt, eta=0.1)["w"]   # ascent gradient
>>> [round(x, 5) for x in v.tolist()]   # -(-g + 0.5 w): the descent gradient with weight decay
[0.5, 2.0]
>>> w.tolist(), opt.state[w]
([1.0, -2.0], {})
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from .vectors import Params

NEEDS_CLOSURE = (torch.optim.LBFGS,)  # their step() re-evaluates the loss: no step from a gradient alone


def copied_step(
    grad_j: dict[str, Tensor | None], params: Params, optimizer: torch.optim.Optimizer, eta: float, clip=1.0
) -> dict[str, Tensor]:
    """``(theta_next - theta) / eta`` (fp32) of ``optimizer.step()`` on the descent gradient
    ``-clip * grad_j``. It carries the rounding of theta (fp32: about 1e-7 |theta| / eta per coordinate).

    ``grad_j`` (ascent, consumed) is None where a parameter got no gradient (the optimizer skips it:
    v = 0 there); a trainable parameter the optimizer does not hold gets v = 0.
    """
    if isinstance(optimizer, NEEDS_CLOSURE):
        raise ValueError(
            f"direction='optimizer-copy': {type(optimizer).__name__}.step() needs a closure that "
            "re-evaluates the loss; the probe forecasts steps taken from a gradient"
        )
    v = {}  # grows as grad_j shrinks: about one copy of the parameters in all
    name_of = {id(p): name for name, p in params.items()}
    for group in optimizer.param_groups:
        hyper = {k: val for k, val in group.items() if k != "params"}
        for p in group["params"]:
            name = name_of.get(id(p))
            g = grad_j.pop(name, None) if name is not None else None
            if g is not None:  # the optimizer skips a parameter without a gradient: v stays 0
                v[name] = _one_step(optimizer, p, g.to(dtype=p.dtype).mul_(-clip), hyper).div_(eta)
    return {
        name: v.pop(name, None) if name in v else torch.zeros_like(p, dtype=torch.float32)
        for name, p in params.items()
    }


def _one_step(optimizer: torch.optim.Optimizer, p: Tensor, grad: Tensor, hyper: dict) -> Tensor:
    """``theta_next - theta`` (fp32) of one parameter: a copy of the optimizer over a copy of ``p`` alone,
    with a copy of ``p``'s state (every torch.optim rule but LBFGS is per parameter), so that the extra
    memory is a few copies of the largest parameter, never of the whole model."""
    twin = p.detach().clone()  # a leaf the copy may step
    twin.grad = grad  # the descent gradient of the loss -J
    try:
        twin_optimizer = type(optimizer)([{**hyper, "params": [twin]}])
    except TypeError as e:  # a constructor with required arguments beyond the param groups
        raise ValueError(
            f"direction='optimizer-copy': cannot build a copy of {type(optimizer).__name__} from its "
            f"param_groups ({e}); use a torch.optim optimizer"
        ) from e
    state = optimizer.state.get(p)
    if state:  # the copy's step() writes its state in place: give it its own
        twin_optimizer.state[twin] = {
            k: x.clone() if isinstance(x, Tensor) else copy.deepcopy(x) for k, x in state.items()
        }
    twin_optimizer.step()
    return twin.detach().float().sub_(p.detach().float())
