"""The second-order pass: per-unit q_n, ``mean_n q_n`` unbiased for ``v^T (grad^2 H) v``
(docs/design.md section 8).

Along ``theta(t) = theta + t v`` write ``dS, d2S, dS_w, d2S_w`` for the first and second derivatives
in t of a sequence's S and S_w. Differentiating ``H = sum_y pi(y) (-S_w(y))`` twice in t:

    d2H/dt2 = E_y[ -(d2S + dS^2) S_w - 2 dS dS_w - d2S_w ]

and ``E_y[d2S + dS^2] = 0`` (the second derivative of ``sum_y pi(y) = 1``), so any baseline that does
not depend on y_i may be subtracted from S_w,i. With the leave-one-out mean b_i of the unit:

    q_n = (1/G) sum_{i in n} [ -(d2S_i + dS_i^2)(S_w,i - b_i) - 2 dS_i dS_w,i - d2S_w,i ]

Nested forward mode (``torch.func.jvp`` of a ``torch.func.jvp``, both along v) gives S, dS and d2S
of every sequence of a microbatch in one pass over the model, storing no activations for a
backward. The pass is the same whichever first-order engine is configured; its cost against the E
pass is in docs/performance.md. ``second_order_ready`` adds to the jvp engine's workarounds
(``jvp.forward_mode_ready``: math attention kernel, gradient-checkpointing input hooks lifted) two
found by the tests against autograd's Hessian-vector products (torch 2.13):

- ``F.layer_norm`` gives a WRONG second forward-mode derivative (off by 30% on a random input
  against finite differences and double backward), so GPT-2's layer norms would silently bias q_n;
- ``F.silu`` has no forward derivative of its derivative under ``no_grad`` (Llama, Qwen2 MLPs).

Both are replaced, for the pass only, by their exact composites of differentiable ops
(``layer_norm``: centre, scale by ``rsqrt(var + eps)``, affine; ``silu``: ``x * sigmoid(x)``),
which forward mode differentiates correctly to any order. The replacement is by attribute
(``torch.nn.functional.layer_norm``), which is how ``nn.LayerNorm`` and Hugging Face models call it; a
model calling ``torch.layer_norm`` directly would not see it. Another op without a second forward
derivative raises a ``NotImplementedError`` naming it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..logprobs import policy_logprobs
from ..objectives import group_sum, per_sequence
from ..vectors import Params, Vector
from .jvp import forward_mode_ready


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    centred = input - input.mean(dim=dims, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(dim=dims, keepdim=True) + eps)  # biased variance, as F's
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


def _silu(input, inplace=False):
    return input * torch.sigmoid(input)


@contextmanager
def second_order_ready(module: nn.Module):
    """``forward_mode_ready`` plus exact composites for ``F.layer_norm`` and ``F.silu``; restored on exit."""
    functional = torch.nn.functional
    saved = functional.layer_norm, functional.silu
    functional.layer_norm, functional.silu = _layer_norm, _silu
    try:
        with forward_mode_ready(module, native_gelu=False):  # nested: the composite's derivatives are known
            yield
    finally:
        functional.layer_norm, functional.silu = saved


@dataclass
class SecondDirectional:
    """S_i, S_w,i and their first and second derivatives along v, all ``(N,)`` and detached."""

    seq: Tensor
    weighted: Tensor
    d_seq: Tensor
    d_weighted: Tensor
    d2_seq: Tensor
    d2_weighted: Tensor


def second_directional_logprobs(
    module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, cfg: ProbeConfig
) -> SecondDirectional:
    """One nested jvp pass over ``batch``; the caller wraps it in ``second_order_ready``."""
    primals = {name: p.detach() for name, p in params.items()}
    tangents = {name: v[name].to(dtype=p.dtype) for name, p in params.items()}

    def seq_and_weighted(theta):
        lp = policy_logprobs(module, batch, cfg, params=theta)
        return lp.seq, lp.weighted

    def first(theta):  # (S, S_w, dS, dS_w) at theta, derivatives along v
        out, d_out = torch.func.jvp(seq_and_weighted, (theta,), (tangents,))
        return (*out, *d_out)

    with torch.no_grad():  # forward mode needs no autograd graph
        (s, sw, ds, dsw), (_, _, d2s, d2sw) = torch.func.jvp(first, (primals,), (tangents,))
    return SecondDirectional(*(t.detach() for t in (s, sw, ds, dsw, d2s, d2sw)))


def unit_second_order(lp: SecondDirectional, batch: RolloutBatch) -> Tensor:
    """``(B,)`` float64 q_n from the per-sequence derivatives (the formula of the module docstring)."""
    sw, ds, dsw, d2s, d2sw = (
        t.double() for t in (lp.weighted, lp.d_seq, lp.d_weighted, lp.d2_seq, lp.d2_weighted)
    )
    g = per_sequence(batch.unit_sizes.to(sw.device).double(), batch)  # (N,) G of each row's unit
    loo = (per_sequence(group_sum(sw, batch), batch) - sw) / (g - 1)  # b_i = mean_{j != i} S_w,j
    per_row = -(d2s + ds * ds) * (sw - loo) - 2.0 * ds * dsw - d2sw  # (N,)
    return group_sum(per_row / g, batch)


def eval_second_order(
    module: nn.Module, params: Params, batch: RolloutBatch, v: Vector, cfg: ProbeConfig
) -> Tensor:
    """``(B_E,)`` float64 q_n for every unit of ``batch``, ``cfg.microbatch_units`` units per pass."""
    q = torch.empty(batch.n_units, dtype=torch.float64, device=batch.device)
    with second_order_ready(module):
        for mb in batch.microbatches(cfg.microbatch_units):
            try:
                lp = second_directional_logprobs(module, params, mb.batch, v, cfg)
            except (
                NotImplementedError
            ) as e:  # an op of the model without a forward derivative of its derivative
                raise NotImplementedError(
                    f"ProbeConfig.second_order: nested forward mode is not supported by an "
                    f"op of {type(module).__name__} ({e}); run with second_order=False"
                ) from e
            q[torch.as_tensor(mb.units, device=q.device)] = unit_second_order(lp, mb.batch)
    return q
