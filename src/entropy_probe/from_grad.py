"""The step the trainer really takes, read from the ``.grad`` already on the parameters
(docs/design.md section 3).

After the trainer's backward (any loss: KL term, importance ratios, accumulation) and its clipping,
``p.grad`` is the gradient of the loss it minimises; the ascent direction is its negative. The
configured rule turns it into v exactly as for a U batch (``direction.build_direction``):
"optimizer-step" is the step ``optimizer.step()`` will take divided by the learning rate (no second
clipping: the trainer clipped already), "adam-preconditioned" is ``P * (-grad)``, "sgd" is ``-grad``.
A parameter whose ``.grad`` is None gets v = 0, as the optimizer skips it.

Learning rates. v is normalised by the optimizer's own rate (``optimizer_lr``: its first group's, or the
largest when that one is 0), so ``theta + optimizer_lr * v`` is the real step with every group at its
own rate; ``ProbeConfig.lr``, when set, replaces eta in ``delta_h1 = eta * Xbar_E . v``: the forecast
is then of the same step with every group's rate scaled by ``lr / optimizer_lr`` (Adam and AdamW
steps, decay included, are linear in the rate). With every rate 0 (warm-up) v is 0 and so is the
forecast.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from .direction import UpdateDirection, build_direction, step_mismatch
from .step_view import StepView
from .vectors import first_nonfinite

NO_GRAD = (
    "from_grad: no trainable parameter has a .grad; call it after loss.backward() and "
    "before optimizer.zero_grad()"
)


def unwrap_optimizer(optimizer):
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (``.optimizer``)."""
    while optimizer is not None and isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_lr(optimizer: torch.optim.Optimizer) -> float:
    """The rate v is normalised by: the first group's lr, or the largest group lr when that is 0."""
    rates = [float(g["lr"]) for g in optimizer.param_groups]
    return rates[0] if rates[0] != 0 else max(rates)


LR_RTOL = 1e-9  # a decision's lr against the optimizer's: the same float, up to a round trip through a logger


def check_step_lr(lr: float | None, optimizer: torch.optim.Optimizer, who: str) -> None:
    """A decision made from a forecast at ``lr`` (``result.lr``) is for the step this optimizer is about to
    take: the same learning rate (``optimizer_lr``), else a ValueError naming both. None: not checked.
    Shared by ``EntropyGuard.applied`` and ``EntropyController`` (one rule for both)."""
    if lr is None:
        return
    own = optimizer_lr(optimizer)
    if not math.isclose(float(lr), own, rel_tol=LR_RTOL, abs_tol=0.0):
        raise ValueError(
            f"{who}: the decision was made for a forecast at lr {lr!r} (result.lr) but the optimizer's lr "
            f"is {own!r}: the forecast is of another step (ProbeConfig.lr set by hand, or the scheduler "
            "moved the lr in between); probe the step the optimizer takes"
        )


def direction_from_grad(
    kind: str, params: dict[str, nn.Parameter], optimizer, v_lr: float, whole: bool = True
) -> UpdateDirection:
    """v from ``-p.grad`` by the rule ``kind``; ``v_lr`` the rate v is normalised by (0: v = 0).

    There is no U batch, so no variance over U (``se_total`` is None). The caller's ``.grad`` is never
    written. ``whole=False`` (not for "optimizer-copy", which steps a copy of the optimizer): v is a
    ``StepView``, which forms each parameter's step where it is used (chunk by chunk in the E pass's
    reverse hook) and holds none whole; the call then peaks where a given v does
    (``ProbeConfig.step_in_hook``). ``whole=True``: one negated copy of the gradient, turned into v in
    place. FSDP2: the caller passes this rank's shards (``fsdp.local_view``, ``passes.grad_view``) and v
    is a local shard, built whole.
    """
    if not whole and kind != "optimizer-copy":
        return _step_view(kind, params, optimizer, v_lr)
    grad_j: dict[str, Tensor | None] = {
        name: None if p.grad is None else -p.grad.detach()  # ascent direction
        for name, p in params.items()
    }
    if all(g is None for g in grad_j.values()):
        raise ValueError(NO_GRAD)
    bad = first_nonfinite(grad_j)
    if bad is not None:
        raise ValueError(f"from_grad: the .grad of parameter {bad!r} is not finite")
    caveat = _rule_caveat(kind, optimizer)
    if v_lr == 0:  # every group at rate 0: the optimizer does not move
        return UpdateDirection(v={n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()})
    return UpdateDirection(v=build_direction(kind, grad_j, params, optimizer, v_lr).v, caveat=caveat)


def _step_view(kind: str, params: dict[str, nn.Parameter], optimizer, v_lr: float) -> UpdateDirection:
    """v as a ``StepView`` over the caller's ``.grad`` (the same checks and caveat as the whole v)."""
    grads = {name: p.grad for name, p in params.items()}
    if all(g is None for g in grads.values()):
        raise ValueError(NO_GRAD)
    bad = first_nonfinite(grads)
    if bad is not None:
        raise ValueError(f"from_grad: the .grad of parameter {bad!r} is not finite")
    caveat = _rule_caveat(kind, optimizer)
    return UpdateDirection(v=StepView(kind, params, optimizer, v_lr), caveat=caveat)


def _rule_caveat(kind: str, optimizer) -> str | None:
    """from_grad forecasts the step ``optimizer.step()`` takes: "sgd" on an optimizer that takes another
    step is refused (it was 45-99.5% off against the real step); "adam-preconditioned" past Adam's first
    step (or with weight decay) is the note's P * (-grad), not the step: a warning, and the result is
    flagged ``reliable=False``."""
    why = step_mismatch(kind, optimizer)
    if why is None:
        return None
    if kind == "sgd":
        raise ValueError(
            f"from_grad: direction='sgd' forecasts the step -lr * grad, which the optimizer does not take: "
            f"{why}. Use direction='optimizer-copy' (any torch.optim optimizer) or 'optimizer-step' "
            "(Adam/AdamW), or give no optimizer and ProbeConfig.lr for the plain gradient step"
        )
    caveat = (
        f"from_grad: direction={kind!r} is not the step the optimizer takes ({why}); the forecast is of "
        "the step along P * (-grad). Use direction='optimizer-step' for the real step"
    )
    warnings.warn(caveat, RuntimeWarning, stacklevel=4)
    return caveat


def grad_checksums(params: dict[str, nn.Parameter]) -> list:
    """Per parameter ``(name, sum, sum of squares)`` of ``.grad`` in float64 (None: no grad): under DDP
    the ranks' averaged gradients must agree, and this is a cheap way to check it (one host sync).
    Not under FSDP2 (``sharded_passes.ShardedPasses.grad_checksums``): each rank holds a different shard."""
    names = [n for n, p in params.items() if p.grad is not None]
    if not names:
        return []
    sums = torch.stack(
        [torch.stack([params[n].grad.double().sum(), params[n].grad.double().square().sum()]) for n in names]
    )  # (P, 2)
    return list(zip(names, sums.tolist()))
