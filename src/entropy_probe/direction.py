"""The update direction v built from the U gradient (DESIGN section 4), ascent convention.

Every direction has the form ``v = b + scale * grad J_U`` with ``scale`` and ``b`` fixed given U
(elementwise, per parameter): the per-unit pieces of the note are ``Y_m = scale * grad J_m`` and
``v = b + mean_m Y_m``. (se_total rebuilds v for each delete-one-unit gradient: update_jackknife.)

- "sgd": ``scale = lr_group / eta``, ``b = 0``.
- "adam-preconditioned" (the note): ``scale = (lr_group / eta) / (sqrt(v_hat) + eps)`` with ``v_hat``
  the bias-corrected second moment Adam's next step would use, ``(b2 * exp_avg_sq + (1 - b2) g^2) /
  (1 - b2^(t+1))``; with no state yet that is Adam's own first step, ``g^2``. ``b = 0``.
- "optimizer-step": exactly ``(theta_next - theta) / eta`` of ``torch.optim.Adam``/``AdamW``: the
  momentum, bias corrections, the second moment updated with this gradient, (decoupled) weight decay,
  per-group learning rates and ``clip_grad_norm_``. The optimizer's state is only read.

``eta`` is the probe's learning rate; per-group rates enter as ``lr_group / eta`` so that
``theta + eta * v`` is the step the optimizer would take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .vectors import Params

DIRECTIONS = ("adam-preconditioned", "optimizer-step", "sgd")
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)


@dataclass
class UpdateDirection:
    """v and its per-unit scale. ``scale`` is None when v was given by the caller. ``grad_j``: the
    grad J_U v was built from, kept by the probe when the jackknife over U (se_total) needs it."""

    v: dict[str, Tensor]
    scale: dict[str, Tensor] | None = None
    grad_j: dict[str, Tensor | None] | None = None


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


def optimizer_hyper(model_params: Params, optimizer: torch.optim.Optimizer | None,
                    default_lr: float) -> dict[str, ParamHyper]:
    """Per-parameter hyper-parameters; a trainable parameter the optimizer does not hold gets lr 0."""
    if optimizer is None:
        return {name: ParamHyper(lr=default_lr) for name in model_params}
    name_of = {id(p): name for name, p in model_params.items()}
    hyper = {name: ParamHyper(lr=0.0) for name in model_params}
    for gi, group in enumerate(optimizer.param_groups):
        if group.get("maximize", False):
            raise ValueError(f"optimizer.param_groups[{gi}] has maximize=True; the probe follows the "
                             "convention loss = -J (minimised); use maximize=False")
        for pi, p in enumerate(group["params"]):
            if not p.requires_grad:
                continue
            name = name_of.get(id(p))
            if name is None:
                raise ValueError(f"optimizer.param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) is not a "
                                 "trainable parameter of the model; the optimizer must hold the model's parameters")
            lr = group["lr"]
            # torch < 2.7: AdamW is not an Adam subclass and its groups carry no decoupled_weight_decay key.
            decoupled = bool(group.get("decoupled_weight_decay", False)) or isinstance(optimizer, torch.optim.AdamW)
            hyper[name] = ParamHyper(
                lr=float(lr), betas=tuple(float(b) for b in group.get("betas", (0.9, 0.999))),
                eps=float(group.get("eps", 1e-8)), weight_decay=float(group.get("weight_decay", 0.0)),
                decoupled=decoupled, amsgrad=bool(group.get("amsgrad", False)),
                state=optimizer.state.get(p) or None)
    return hyper


def _require_adam(optimizer, kind: str) -> None:
    if optimizer is None:
        raise ValueError(f"direction={kind!r} needs an optimizer (torch.optim.Adam or AdamW); none was given")
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):  # separate classes before torch 2.7
        raise ValueError(f"direction={kind!r} supports torch.optim.Adam and AdamW; got {type(optimizer).__name__}")


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


def build_direction(kind: str, grad_j: dict[str, Tensor | None], params: Params,
                    optimizer: torch.optim.Optimizer | None, lr: float,
                    max_grad_norm: float | None = None) -> UpdateDirection:
    """v (fp32) and its scale from ``grad_j`` = grad J_U (None where the parameter got no gradient).

    A parameter with no gradient is skipped by ``optimizer.step()``; here it gets v = 0.
    """
    if kind != "sgd" and optimizer is not None:
        _require_adam(optimizer, kind)
    if kind == "optimizer-step":
        _require_adam(optimizer, kind)
    hyper = optimizer_hyper(params, optimizer, default_lr=lr)
    clip = _clip_coefficient(grad_j, max_grad_norm) if kind == "optimizer-step" else 1.0
    v: dict[str, Tensor] = {}
    scale: dict[str, Tensor] = {}
    for name, p in params.items():
        h, g = hyper[name], grad_j[name]
        if g is None or h.lr == 0.0:
            v[name] = torch.zeros_like(p, dtype=torch.float32)
            scale[name] = torch.zeros_like(p, dtype=torch.float32)
            continue
        g = g.float()
        ratio = h.lr / lr
        if kind == "sgd":
            scale[name] = torch.full_like(g, ratio)
            v[name] = ratio * g
        elif kind == "adam-preconditioned":
            # The v_hat of the step Adam is about to take: this gradient folded into the second moment,
            # bias-corrected. With no state it is g^2 (the design's "first step"); using the stored
            # moment alone would give coordinates never seen before P = 1/eps.
            beta2, eps = h.betas[1], h.eps
            step = _step_of(h.state) + 1
            exp_avg_sq = h.state["exp_avg_sq"].float() if h.state and "exp_avg_sq" in h.state else torch.zeros_like(g)
            v_hat = exp_avg_sq.mul(beta2).addcmul(g, g, value=1 - beta2) / (1 - beta2 ** step)
            scale[name] = ratio / (v_hat.sqrt() + eps)
            v[name] = scale[name] * g
        else:
            v[name], scale[name] = _adam_step(p, -clip * g, h, lr)
            scale[name] = scale[name] * clip  # d step / d grad_J (descent gradient is -clip * grad_J)
    return UpdateDirection(v=v, scale=scale)


def _adam_step(p: Tensor, grad: Tensor, h: ParamHyper, eta: float) -> tuple[Tensor, Tensor]:
    """``(step / eta, d(step/eta)/d(-grad))`` of one Adam/AdamW update, mirroring torch's arithmetic.

    ``grad`` is the descent gradient (of the loss -J), already clipped.
    """
    beta1, beta2 = h.betas
    theta = p.detach().float()
    state = h.state or {}
    step = _step_of(state) + 1
    exp_avg = state["exp_avg"].float() if "exp_avg" in state else torch.zeros_like(grad)
    exp_avg_sq = state["exp_avg_sq"].float() if "exp_avg_sq" in state else torch.zeros_like(grad)
    if h.weight_decay != 0 and not h.decoupled:
        grad = grad.add(theta, alpha=h.weight_decay)
    m = exp_avg.lerp(grad, 1 - beta1)
    v2 = exp_avg_sq.mul(beta2).addcmul(grad, grad, value=1 - beta2)
    if h.amsgrad:
        v2 = torch.maximum(state["max_exp_avg_sq"].float(), v2) if "max_exp_avg_sq" in state else v2
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    step_size = h.lr / bias_correction1
    denom = (v2.sqrt() / bias_correction2_sqrt).add_(h.eps)
    delta = -step_size * (m / denom)
    if h.weight_decay != 0 and h.decoupled:
        delta = delta - h.lr * h.weight_decay * theta
    # Linear part: m depends on grad with slope (1 - beta1); delta on m with -step_size / denom.
    slope = (step_size * (1 - beta1) / eta) / denom
    return delta / eta, slope
