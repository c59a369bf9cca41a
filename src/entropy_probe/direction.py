"""The update direction v built from the U gradient (DESIGN section 4), ascent convention.

Each rule maps grad J_U to v elementwise, per parameter (se_total rebuilds v by the same rule for
each delete-one-unit gradient: update_jackknife):

- "sgd": ``v = (lr_group / eta) grad J_U``.
- "adam-preconditioned" (the note): ``v = (lr_group / eta) grad J_U / (sqrt(v_hat) + eps)`` with ``v_hat``
  the bias-corrected second moment Adam's next step would use, ``(b2 * exp_avg_sq + (1 - b2) g^2) /
  (1 - b2^(t+1))``; with no state yet that is Adam's own first step, ``g^2``.
- "optimizer-step": exactly ``(theta_next - theta) / eta`` of ``torch.optim.Adam``/``AdamW``: the
  momentum, bias corrections, the second moment updated with this gradient, (decoupled) weight decay,
  per-group learning rates and ``clip_grad_norm_``. The optimizer's state is only read.

- "optimizer-copy": the step of any ``torch.optim`` optimizer, taken by a copy of it
  (``optimizer_copy.copied_step``).

``eta`` is the probe's learning rate; per-group rates enter as ``lr_group / eta`` so that
``theta + eta * v`` is the step the optimizer would take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .batch import RolloutBatch
from .config import DIRECTIONS  # noqa: F401  (the config owns the lists)
from .optimizer_copy import copied_step
from .vectors import Params, first_nonfinite

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)


@dataclass
class UpdateDirection:
    """v, and what the jackknife over U (se_total) needs of the U that built it: ``grad_j`` (the grad
    J_U v was built from, kept when asked for), this rank's U ``batch`` and its loss coefficients
    ``coeff`` (``(N_U,)`` c_i), and ``n_units`` = B_U over all ranks. All empty when v was given or came
    from ``.grad``."""

    v: dict[str, Tensor]
    grad_j: dict[str, Tensor | None] | None = None
    batch: RolloutBatch | None = None
    coeff: Tensor | None = None
    n_units: int = 0
    caveat: str | None = None  # why v may not be the step the optimizer takes (the result is then unreliable)


@dataclass
class ParamHyper:
    """What the optimizer would apply to one parameter."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    amsgrad: bool = False
    state: dict | None = None


def optimizer_hyper(
    model_params: Params, optimizer: torch.optim.Optimizer | None, default_lr: float
) -> dict[str, ParamHyper]:
    """Per-parameter hyper-parameters; a trainable parameter the optimizer does not hold gets lr 0."""
    if optimizer is None:
        return {name: ParamHyper(lr=default_lr) for name in model_params}
    name_of = {id(p): name for name, p in model_params.items()}
    hyper = {name: ParamHyper(lr=0.0) for name in model_params}
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise ValueError(
                f"optimizer.param_groups[{gi}] has maximize=True; the probe follows the "
                "convention loss = -J (minimised); use maximize=False"
            )
        for pi, p in enumerate(group["params"]):
            if not p.requires_grad:
                continue
            name = name_of.get(id(p))
            if name is None:
                raise ValueError(
                    f"optimizer.param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) is not a "
                    "trainable parameter of the model; the optimizer must hold the model's parameters"
                )
            lr = group["lr"]
            # torch < 2.7: AdamW is not an Adam subclass and its groups carry no decoupled_weight_decay key.
            decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(
                optimizer, torch.optim.AdamW
            )
            hyper[name] = ParamHyper(
                lr=float(lr),
                betas=tuple(float(b) for b in group.get("betas", (0.9, 0.999))),
                eps=float(group.get("eps", 1e-8)),
                weight_decay=float(group.get("weight_decay", 0.0)),
                decoupled=decoupled,
                amsgrad=bool(group.get("amsgrad", False)),
                state=optimizer.state.get(p) or None,
            )
    return hyper


def _require_adam(optimizer, kind: str) -> None:
    if optimizer is None:
        raise ValueError(f"direction={kind!r} needs an optimizer (torch.optim.Adam or AdamW); none was given")
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):  # separate classes before torch 2.7
        raise ValueError(
            f"direction={kind!r} supports torch.optim.Adam and AdamW; got {type(optimizer).__name__} "
            "(direction='optimizer-copy' takes the step of any torch.optim optimizer)"
        )


def step_mismatch(kind: str, optimizer: torch.optim.Optimizer | None) -> str | None:
    """Why the rule ``kind`` is not the step ``optimizer.step()`` takes from the gradient, or None.

    "optimizer-step" (Adam/AdamW, checked when built) and "optimizer-copy" are the step by construction;
    "sgd" is ``-lr * grad``: plain SGD, or SGD with momentum before its first buffer (not Nesterov);
    "adam-preconditioned" is ``-lr * P grad``: Adam's first step without weight decay.
    """
    if optimizer is None or kind in ("optimizer-step", "optimizer-copy"):
        return None
    name = type(optimizer).__name__
    if kind == "sgd":
        if type(optimizer) is not torch.optim.SGD:
            return f"{name} does not take the step -lr * grad"
        for gi, group in enumerate(optimizer.param_groups):
            buffers = any(
                optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in group["params"]
            )
            if group.get("weight_decay", 0) != 0:
                return f"SGD param_groups[{gi}] has weight_decay={group['weight_decay']}"
            if group.get("momentum", 0) != 0 and (group.get("nesterov", False) or buffers):
                return (
                    f"SGD param_groups[{gi}] has momentum={group['momentum']} (a momentum buffer or Nesterov)"
                )
        return None
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("weight_decay", 0) != 0:
            return f"{name} param_groups[{gi}] has weight_decay={group['weight_decay']}"
        if any(_step_of(optimizer.state.get(p)) > 0 for p in group["params"]):
            return f"{name} param_groups[{gi}] is past its first step (momentum and bias correction)"
    return None


def _clip_coefficient(grads: dict[str, Tensor | None], max_grad_norm: float | None) -> float:
    """The factor ``clip_grad_norm_(max_norm)`` would multiply every gradient by."""
    if max_grad_norm is None:
        return 1.0
    norms = [torch.linalg.vector_norm(g.float()) for g in grads.values() if g is not None]
    if not norms:
        return 1.0
    total = torch.linalg.vector_norm(torch.stack(norms))
    return float(torch.clamp(max_grad_norm / (total + CLIP_EPS), max=1.0))


def _step_of(state: dict | None) -> int:
    if not state or "step" not in state:
        return 0
    step = state["step"]
    return int(step.item() if isinstance(step, Tensor) else step)


def build_direction(
    kind: str,
    grad_j: dict[str, Tensor | None],
    params: Params,
    optimizer: torch.optim.Optimizer | None,
    lr: float,
    max_grad_norm: float | None = None,
) -> UpdateDirection:
    """v (fp32) from ``grad_j`` = grad J_U (None where the parameter got no gradient).

    A parameter with no gradient is skipped by ``optimizer.step()``; here it gets v = 0.
    Memory: ``grad_j`` is consumed and its tensors are overwritten (pass tensors the probe owns, never a
    caller's ``.grad``). "sgd" and "adam-preconditioned" build v in place in the fp32
    gradient (one copy of the parameters in all); "optimizer-step" releases each gradient once its v
    is made.
    """
    if kind == "optimizer-copy":
        if optimizer is None:
            raise ValueError("direction='optimizer-copy' needs the run's optimizer; none was given")
        optimizer_hyper(params, optimizer, default_lr=lr)  # the same checks of the param groups
        return UpdateDirection(
            v=copied_step(grad_j, params, optimizer, lr, _clip_coefficient(grad_j, max_grad_norm))
        )
    if kind != "sgd" and optimizer is not None:
        _require_adam(optimizer, kind)
    if kind == "optimizer-step":
        _require_adam(optimizer, kind)
    hyper = optimizer_hyper(params, optimizer, default_lr=lr)
    clip = _clip_coefficient(grad_j, max_grad_norm) if kind == "optimizer-step" else 1.0
    v: dict[str, Tensor] = {}
    for name, p in params.items():
        h, g = hyper[name], grad_j.pop(name)  # consumed: the gradient becomes v or is released
        if g is None or h.lr == 0.0:
            v[name] = torch.zeros_like(p, dtype=torch.float32)
            continue
        g = g.float()
        ratio = h.lr / lr
        if kind == "sgd":
            v[name] = g.mul_(ratio)
        elif kind == "adam-preconditioned":
            # The v_hat of the step Adam is about to take: this gradient folded into the second moment,
            # bias-corrected. With no state it is g^2 (the design's "first step"); using the stored
            # moment alone would give coordinates never seen before P = 1/eps.
            beta2, eps = h.betas[1], h.eps
            step = _step_of(h.state) + 1
            exp_avg_sq = (
                h.state["exp_avg_sq"].float() if h.state and "exp_avg_sq" in h.state else torch.zeros_like(g)
            )
            v_hat = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2).div_(1 - beta2**step)
            denom = v_hat.sqrt_().add_(eps)  # (one parameter's temporary, in place)
            v[name] = g.div_(denom).mul_(ratio)
        else:
            v[name] = _adam_step(p, g.mul_(-clip), h, lr)  # the descent gradient is -clip * grad_J
        del g
    return UpdateDirection(v=v)


def _adam_step(p: Tensor, grad: Tensor, h: ParamHyper, eta: float) -> Tensor:
    """``step / eta`` of one Adam/AdamW update, mirroring torch's arithmetic.

    ``grad`` is the descent gradient (of the loss -J), already clipped; it is overwritten (the probe
    owns it). Two temporaries of this parameter's size (m, which becomes the step, and the denominator).
    """
    beta1, beta2 = h.betas
    theta = p.detach().float()
    state = h.state or {}
    step = _step_of(state) + 1
    exp_avg = state["exp_avg"].float() if "exp_avg" in state else torch.zeros_like(grad)
    exp_avg_sq = state["exp_avg_sq"].float() if "exp_avg_sq" in state else torch.zeros_like(grad)
    if h.weight_decay != 0 and not h.decoupled:
        grad = grad.add_(theta, alpha=h.weight_decay)
    m = exp_avg.lerp(grad, 1 - beta1)
    denom = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)  # the second moment v2
    if h.amsgrad and "max_exp_avg_sq" in state:
        torch.maximum(state["max_exp_avg_sq"].float(), denom, out=denom)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = h.lr / bias_correction1
    denom.sqrt_().div_(bias_correction2_sqrt).add_(h.eps)
    delta = m.div_(denom).mul_(-step_size)  # -step_size * (m / denom), in m's storage
    if h.weight_decay != 0 and h.decoupled:
        delta.sub_(h.lr * h.weight_decay * theta)
    return delta.div_(eta)


def given_direction(v: dict[str, Tensor], params: Params) -> UpdateDirection:
    """A caller's v (``run(direction=v)``) checked against the trainable parameters; fp32 on their devices."""
    if not isinstance(v, dict):
        raise ValueError(
            f"direction must be a dict {{name: tensor}} from update_direction(), got {type(v).__name__}"
        )
    missing, extra = sorted(set(params) - set(v)), sorted(set(v) - set(params))
    if missing or extra:
        raise ValueError(
            f"direction does not match the model's trainable parameters: missing {missing[:3]}"
            f"{'...' if len(missing) > 3 else ''}, unknown {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    out = {}
    for name, p in params.items():
        t = v[name]
        if not isinstance(t, Tensor) or tuple(t.shape) != tuple(p.shape):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"direction[{name!r}] has shape {shape}, the parameter has {tuple(p.shape)}")
        out[name] = t.detach().to(device=p.device, dtype=torch.float32)
    bad = first_nonfinite(out)
    if bad is not None:
        raise ValueError(f"direction[{bad!r}] is not finite")
    return UpdateDirection(v=out)
