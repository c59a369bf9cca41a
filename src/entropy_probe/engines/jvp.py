"""The "jvp" engine: every s_n of a microbatch of E units from one forward-mode pass.

s_n = v . X_n needs only the per-sequence directional derivatives ``dS_i = grad S_i . v`` and
``dS_w,i = grad S_w,i . v`` (docs/design.md section 11): X_n is the gradient of the E surrogate
``sum_{i in n} a_i S_i + e_i S_w,i`` with (a, e) constant given the batch, so

    s_n = sum_{i in n} a_i dS_i + e_i dS_w,i       (a, e from objectives.entropy_gradient_coefficients)

``torch.func.jvp`` over ``functional_call`` gives (S_i, S_w,i) and (dS_i, dS_w,i) of every sequence of
a microbatch in one pass that stores no activations for a backward. Three facts make it work on
Hugging Face models (torch 2.13, transformers 5.23):

- fused scaled-dot-product-attention kernels have no forward-mode derivative: the pass runs under
  ``sdpa_kernel(SDPBackend.MATH)``, the composite kernel built from differentiable ops;
- the input hook that gradient checkpointing installs (``output.requires_grad_(True)`` on the
  embeddings) breaks ``jvp``: it is lifted for the pass and put back exactly as it was;
- the tangent must have its parameter's dtype (v is fp32, a bf16 model's parameters are not).

Entry points: ``eval_projections`` (probe.run with ``engine="jvp"``) and ``directional_logprobs``
(the per-sequence derivatives).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..logprobs import policy_logprobs
from ..objectives import entropy_surrogate
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
def forward_mode_ready(module: nn.Module):
    """Math attention kernels, and every gradient-checkpointing input hook lifted; restored on exit."""
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
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for hooks, before in reversed(lifted):
            hooks.clear()
            hooks.update(before)  # same hooks, same ids, same order


def directional_logprobs(
    module: nn.Module, params: Params, batch: RolloutBatch, direction: Vector, cfg: ProbeConfig
) -> DirectionalLogProbs:
    """(S_i, S_w,i) and (grad S_i . d, grad S_w,i . d) for every row of ``batch``, one jvp pass.

    The caller wraps it in ``forward_mode_ready``; ``direction`` is keyed like ``params``.
    """
    primals = {name: p.detach() for name, p in params.items()}
    tangents = {name: direction[name].to(dtype=p.dtype) for name, p in params.items()}

    def seq_and_weighted(theta):
        lp = policy_logprobs(module, batch, cfg, params=theta)
        return lp.seq, lp.weighted

    # no_grad: the primals are detached, nothing is built for a backward.
    with torch.no_grad():
        (seq, weighted), (d_seq, d_weighted) = torch.func.jvp(seq_and_weighted, (primals,), (tangents,))
    return DirectionalLogProbs(seq.float(), weighted.float(), d_seq.float(), d_weighted.float())


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
