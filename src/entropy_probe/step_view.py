"""v from the trainer's ``.grad``, formed parameter by parameter where it is used, never whole.

``run(eval_batch=E, from_grad=True)`` needs v only inside the E pass, where each parameter's share of
X_n is dotted with v the moment the reverse pass forms it (``engines.backward.projected_backward``).
Building v whole first cost one fp32 copy of the parameters (plus the rule's temporaries) on top of
the pass: 1.6x the fp32 parameter bytes at the peak on a 29M-parameter GPT-2 (docs/performance.md).
``StepView`` holds no parameter-sized tensor instead. It reads, when asked, the parameter's ``.grad``,
the optimizer's state and hyper-parameters (weight decay, betas, per-group rate) and forms that
parameter's step by the configured rule (``direction.parameter_direction``, the same arithmetic as
the whole v, elementwise, so chunk by chunk it gives the same numbers):

- ``dot(name, x)``: ``x . v[name]`` in chunks of ``CHUNK`` elements (``CHUNK_CUDA`` on a GPU): the step
  is never held whole, only one chunk's temporaries (a few times 256 KiB on a CPU);
- ``view[name]``: the whole fp32 v of one parameter (the jvp engine's tangents, the truth's step):
  formed anew on every read, so a caller that reads every entry at once holds v whole again.

The price is arithmetic: the step is formed again for every E unit (about ten elementwise passes over
the parameters per unit, against the one of the dot product), except for parameters smaller than
a chunk, whose steps are formed once and kept (they are many and cheap to hold, and per-op overhead
dominates their cost). ``ProbeConfig.step_in_hook=False`` builds v whole instead
(``from_grad.direction_from_grad``), for runs where memory does not bind and sequences are short.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from .direction import ParamHyper, _require_adam, _step_of, optimizer_hyper, parameter_direction
from .vectors import Params

CHUNK = 1 << 16  # elements, CPU: one chunk's temporaries stay in the cache; below this a step is kept whole
CHUNK_CUDA = 1 << 24  # elements: on a GPU each op is a kernel launch; 64 MiB temporaries are small there


def chunk_size(device: torch.device) -> int:
    """Elements per chunk of a step formed in the hook (module constants: tests lower them)."""
    return CHUNK_CUDA if device.type == "cuda" else CHUNK


class StepView(Mapping):
    """``{name: fp32 v}`` for the step the optimizer will take from the ``.grad`` now on ``params``.

    kind: the direction rule ("optimizer-step", "adam-preconditioned", "sgd"); ``v_lr``: the rate v is
    normalised by (> 0). Nothing of the caller's is written (the gradient is copied chunk by chunk
    before the rule overwrites it). The ``.grad`` and the optimizer state must not change while the
    view is in use (one probe call).
    """

    def __init__(self, kind: str, params: Params, optimizer, v_lr: float):
        if kind == "optimizer-step" or (kind != "sgd" and optimizer is not None):
            _require_adam(optimizer, kind)  # the checks of direction.build_direction
        self.kind, self.params, self.lr = kind, params, v_lr
        self.hyper = optimizer_hyper(params, optimizer, default_lr=v_lr)
        for h in self.hyper.values():  # the step count as an int: no host sync per chunk on a GPU
            if h.state is not None:
                h.state = {**h.state, "step": _step_of(h.state)}
        self.chunk = chunk_size(next(iter(params.values())).device)
        # the common rules with a shorter formula for a dot product (AdamW with state, SGD)
        self.fast = {
            name: f for name, p in params.items() if (f := _fast_dot(kind, p, self.hyper[name], v_lr))
        }
        self.kept = {
            name: self._form(name, 0, p.numel()).reshape(p.shape)
            for name, p in params.items()
            if p.numel() < self.chunk
        }

    def __getitem__(self, name: str) -> Tensor:
        if name in self.kept:
            return self.kept[name]
        p = self.params[name]
        return self._form(name, 0, p.numel()).reshape(p.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def part(self, name: str, start: int, stop: int) -> Tensor:
        """Flat fp32 ``v[name]`` over elements ``[start, stop)`` (the stepped forwards, ``stepped``)."""
        if name in self.kept:
            return self.kept[name].reshape(-1)[start:stop]
        return self._form(name, start, stop)

    def dot(self, name: str, x: Tensor) -> Tensor:
        """fp32 device scalar ``x . v[name]`` (``x`` parameter-shaped), one chunk of the step at a time."""
        x = x.reshape(-1)
        if name in self.kept:
            return torch.vdot(x.float(), self.kept[name].reshape(-1))
        fast = self.fast.get(name)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, x.numel(), self.chunk):
            stop = min(start + self.chunk, x.numel())
            xs = x[start:stop].float()
            total += fast(xs, start, stop) if fast else torch.vdot(xs, self._form(name, start, stop))
        return total

    def _form(self, name: str, start: int, stop: int) -> Tensor:
        """Flat fp32 v of ``params[name]`` over elements ``[start, stop)``."""
        p, h = self.params[name], self.hyper[name]
        flat = p.detach().reshape(-1)[start:stop]
        if p.grad is None or h.lr == 0.0:
            return torch.zeros(stop - start, dtype=torch.float32, device=p.device)
        grad = (
            -p.grad.detach().reshape(-1)[start:stop].float()
        )  # ascent direction; a copy: the rule writes it
        return parameter_direction(self.kind, flat, grad, _sliced(h, start, stop), self.lr)


def _sliced(h: ParamHyper, start: int, stop: int) -> ParamHyper:
    """``h`` with its parameter-shaped state tensors cut to elements ``[start, stop)`` (views, no copy)."""
    if not h.state:
        return h
    state = {
        k: t.reshape(-1)[start:stop] if isinstance(t, Tensor) and t.dim() > 0 else t
        for k, t in h.state.items()
    }
    return ParamHyper(h.lr, h.betas, h.eps, h.weight_decay, h.decoupled, h.amsgrad, state)


def _fast_dot(kind: str, p: Tensor, h: ParamHyper, eta: float):
    """A chunk's ``x . v`` by a shorter formula where the rule allows one (fp32 tensors), else None."""
    if p.grad is None or h.lr == 0.0 or p.dtype != torch.float32 or p.grad.dtype != torch.float32:
        return None
    if kind == "sgd":
        grad, scale = p.grad.detach().reshape(-1), -h.lr / eta  # v = (lr / eta) (-grad)
        return lambda x, start, stop: torch.vdot(x, grad[start:stop]) * scale
    state = h.state or {}
    plain_adam = kind == "optimizer-step" and not h.amsgrad and (h.decoupled or h.weight_decay == 0.0)
    moments = [state.get(k) for k in ("exp_avg", "exp_avg_sq")]
    if not plain_adam or any(m is None or m.dtype != torch.float32 for m in moments):
        return None
    return _AdamDot(p, h, eta)


class _AdamDot:
    """``x . v`` over a chunk for an Adam/AdamW "optimizer-step" with state, no amsgrad and decoupled (or
    no) decay. ``direction._adam_step`` forms ``v = -(lr / bc1) m / (sqrt(v2) / bc2s + eps) / eta -
    (lr wd / eta) theta`` (m, v2: the moments with this gradient folded in); regrouped as
    ``c_m x . (m / (sqrt(v2) + eps bc2s)) + c_theta x . theta`` it takes 7 elementwise passes over the
    chunk instead of 15, and reads the caller's gradient without copying it. The same value up to fp32
    rounding (tests/test_step_view.py)."""

    def __init__(self, p: Tensor, h: ParamHyper, eta: float):
        (self.beta1, self.beta2), step = h.betas, h.state["step"] + 1
        bc1, bc2s = 1 - self.beta1**step, (1 - self.beta2**step) ** 0.5
        self.c_m, self.eps = -(h.lr / bc1) * bc2s / eta, h.eps * bc2s
        self.c_theta = -(h.lr * h.weight_decay) / eta if h.decoupled else 0.0
        self.theta, self.grad = p.detach().reshape(-1), p.grad.detach().reshape(-1)
        self.exp_avg, self.exp_avg_sq = h.state["exp_avg"].reshape(-1), h.state["exp_avg_sq"].reshape(-1)

    def __call__(self, x: Tensor, start: int, stop: int) -> Tensor:
        g = self.grad[start:stop]
        m = torch.lerp(self.exp_avg[start:stop], g, 1 - self.beta1)  # the first moment after this step
        d = torch.mul(self.exp_avg_sq[start:stop], self.beta2).addcmul_(g, g, value=1 - self.beta2)
        out = torch.vdot(x, m.div_(d.sqrt_().add_(self.eps))) * self.c_m
        if self.c_theta:
            out = out + torch.vdot(x, self.theta[start:stop]) * self.c_theta
        return out
