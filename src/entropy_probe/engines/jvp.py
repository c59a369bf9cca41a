"""The "jvp" engine: every s_n of a microbatch of E units from one forward-mode pass.

s_n = v . X_n needs only the per-sequence directional derivatives ``dS_i = grad S_i . v`` and
``dS_w,i = grad S_w,i . v`` (docs/design.md section 11): X_n is the gradient of the E surrogate
``sum_{i in n} a_i S_i + e_i S_w,i`` with (a, e) constant given the batch, so

    s_n = sum_{i in n} a_i dS_i + e_i dS_w,i       (a, e from objectives.entropy_gradient_coefficients)

Forward mode (``along``: autograd's forward AD over ``functional_call``) gives (S_i, S_w,i) and
(dS_i, dS_w,i) of every sequence of a microbatch in one pass that stores no activations for a backward.
Four facts shape it on Hugging Face models (torch 2.13, transformers 5.23):

- fused scaled-dot-product-attention kernels have no forward-mode derivative: the pass runs under
  ``sdpa_kernel(SDPBackend.MATH)``, the composite kernel built from differentiable ops;
- the input hook that gradient checkpointing installs (``output.requires_grad_(True)`` on the
  embeddings) breaks ``jvp``: it is lifted for the pass and put back exactly as it was;
- the tangent must have its parameter's dtype (v is fp32, a bf16 model's parameters are not);
- GPT-2's ``gelu_new`` (``NewGELUActivation``) is a Python composite of seven elementwise ops whose
  forward-mode derivatives run through decompositions: four times the native ``F.gelu(x,
  approximate="tanh")``, the same function, under forward mode (measured: 2.7 against 0.7 ms on a
  (32, 24, 256) input, CPU); a tiny GPT-2's token pass over E took 13% less time with the native op. The
  first-order passes call the native op instead (equal to fp32 rounding, 2e-7 on that input); the
  second-order pass keeps the composite, whose second forward derivative is known to be right.

Entry points: ``eval_projections`` (probe.run with ``engine="jvp"``) and ``directional_logprobs``
(the per-sequence derivatives).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..logprobs import policy_logprobs
from ..objectives import entropy_surrogate
from ..stepped import direction_form, on_read
from ..vectors import Params, Vector
from .backward import projected_backward
from .projections import EvalProjections


@dataclass
class DirectionalLogProbs:
    """S_i, S_w,i and their derivatives along one direction, all ``(N,)`` fp32 and detached."""

    seq: Tensor
    weighted: Tensor
    d_seq: Tensor
    d_weighted: Tensor


@contextmanager
def forward_mode_ready(module: nn.Module, native_gelu: bool = True):
    """Math attention kernels, and every gradient-checkpointing input hook lifted; with ``native_gelu``
    every ``NewGELUActivation`` of the model computed by the native op (module docstring). Restored on
    exit, also on an exception."""
    lifted = []  # (hook dict, its full content before) for each dict we touched
    for sub in module.modules():
        # transformers 5 keeps a list of handles; older releases (and PEFT on them) one `_require_grads_hook`
        handles = list(getattr(sub, "_require_grads_hooks", None) or ())
        handles += [getattr(sub, "_require_grads_hook")] if hasattr(sub, "_require_grads_hook") else []
        for handle in handles:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and handle.id in hooks:
                lifted.append((hooks, hooks.copy()))
                del hooks[handle.id]
    # a module whose forward is already an instance attribute (accelerate's hooks) keeps it
    swapped = (
        [m for m in module.modules() if _is_new_gelu(m) and "forward" not in vars(m)] if native_gelu else []
    )
    try:
        for m in swapped:  # an instance attribute shadows the class's forward for this pass only
            m.forward = _native_gelu
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for m in swapped:
            del m.forward
        for hooks, before in reversed(lifted):
            hooks.clear()
            hooks.update(before)  # same hooks, same ids, same order


def _is_new_gelu(m: nn.Module) -> bool:
    return type(m).__name__ == "NewGELUActivation" and type(m).__module__.startswith("transformers.")


def _native_gelu(x: Tensor) -> Tensor:
    """``NewGELUActivation``'s function, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, by one op."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def directional_logprobs(
    module: nn.Module, params: Params, batch: RolloutBatch, direction: Vector, cfg: ProbeConfig
) -> DirectionalLogProbs:
    """(S_i, S_w,i) and (grad S_i . d, grad S_w,i . d) for every row of ``batch``, one jvp pass.

    The caller wraps it in ``forward_mode_ready``; ``direction`` is keyed like ``params``.
    """

    def seq_and_weighted(theta):
        lp = policy_logprobs(module, batch, cfg, params=theta)
        return lp.seq, lp.weighted

    (seq, weighted), (d_seq, d_weighted) = along(seq_and_weighted, params, direction)
    return DirectionalLogProbs(seq.float(), weighted.float(), d_seq.float(), d_weighted.float())


def along(fn: Callable[[Params], tuple[Tensor, ...]], params: Params, direction: Vector):
    """``(fn(theta), its derivative along direction)`` at the parameters, each a tuple of detached tensors:
    one pass of autograd's forward AD (``torch.autograd.forward_ad``; ``torch.func.jvp`` gave the same
    numbers about 10% slower on CPU).

    Each parameter enters as a dual tensor (its value, with ``direction[name]`` cast to its dtype as the
    tangent) formed when an op reads it and dropped when the op returns (``stepped.on_read``): a
    direction from ``from_grad`` (a ``StepView``) is formed one parameter at a time, chunk by chunk, and
    never held whole.
    The caller wraps it in ``forward_mode_ready``."""

    def dual(p: Tensor, name: str):
        tangent = direction_form(p, direction, name, p.dtype)  # a StepView's step chunk by chunk
        return lambda: fwAD.make_dual(p.detach(), tangent())

    with torch.no_grad(), fwAD.dual_level():  # no_grad: nothing is built for a backward
        theta = {name: on_read(p, p.dtype, dual(p, name)) for name, p in params.items()}
        pairs = [fwAD.unpack_dual(out) for out in fn(theta)]
    values = tuple(pair.primal for pair in pairs)
    tangents = tuple(
        torch.zeros_like(pair.primal) if pair.tangent is None else pair.tangent for pair in pairs
    )
    return values, tangents


def eval_projections(
    module: nn.Module,
    params: Params,
    batch: RolloutBatch,
    v: Vector,
    cfg: ProbeConfig,
    halves: Tensor | None = None,
) -> EvalProjections:
    """s_n for every E unit, ``cfg.microbatch_units`` units per forward-mode pass.

    Also dS_i of every row (``EvalProjections.d_seq``, for the large-step diagnostic). With ``halves``
    (``(B_E,)`` 0/1 per unit) also the sums of X_n over the two halves: one reverse
    pass per microbatch of each half's units over their summed E surrogate (no per-unit backward).
    """
    out = EvalProjections.empty(batch, v, halves)
    out.d_seq = torch.empty(batch.n_sequences, dtype=torch.float32, device=batch.device)  # (N,)
    with forward_mode_ready(module):
        for mb in batch.microbatches(cfg.microbatch_units):
            lp = directional_logprobs(module, params, mb.batch, v, cfg)
            units = torch.as_tensor(mb.units, device=out.s.device)
            out.s[units] = entropy_surrogate(lp, mb.batch, cfg.x_estimator, tangent=True)  # (B_mb,)
            out.logprobs.put(mb.rows, lp)
            out.d_seq[mb.rows] = lp.d_seq
    if out.x_half is not None:
        for h in (0, 1):  # each half's units microbatched on their own: one reverse pass per microbatch
            units = (halves == h).nonzero().reshape(-1).tolist()
            if not units:
                continue
            for mb in batch.select_units(units).microbatches(cfg.microbatch_units):
                lp = policy_logprobs(module, mb.batch, cfg)
                surrogate = entropy_surrogate(lp, mb.batch, cfg.x_estimator)
                # this microbatch's X_n added into the half's sum as the backward forms them, never whole
                projected_backward(surrogate, params, v, out.x_half[h])
    return out
