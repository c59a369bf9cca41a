"""The parameters at ``theta + step * v``, each formed where the forward reads it (docs/design.md section 11).

The truth, the large-step diagnostic and the lookahead (``passes.Passes.logprobs_stepped``) evaluate the
model at stepped parameters through ``torch.func.functional_call``. Forming every stepped parameter
first holds one more copy of the model for the whole forward (1x the fp32 parameter bytes; a bf16 model
also held its fp32 copy, ``truth.full_precision_state``): on a 29M-parameter GPT-2 that doubled the
peak of ``run(eval_batch=E, from_grad=True)``, whose E pass stays at 0.5x (docs/performance.md).

Here each value handed to ``functional_call`` is a ``FormedOnRead`` tensor: a wrapper with the shape,
dtype and device of the value and no storage, which forms the value (``theta + step * v`` in chunks of
``step_view.chunk_size`` elements, a ``StepView``'s step formed chunk by chunk too) when an op reads it
and lets it go when the op returns. A forward then holds one parameter's stepped value at a time (the
largest tensor) instead of all of them. Metadata (shape, dtype, device, ``size()``...) is answered
without forming anything. The values are the same bits as a whole ``vectors.stepped_parameters``: the
same elementwise ops on each element. The live parameters are never written, so nothing needs to be
restored, also when the forward raises.

The price is arithmetic: a value is formed again every time an op reads it (a tied weight twice per
forward, every tensor once per microbatch). Values below one chunk are formed once, when the mapping is
made, and handed over as plain tensors (for the life of the mapping, one stepped evaluation): they are
many, cheap to hold, and the wrapper's per-op cost would dominate theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from .step_view import StepView, chunk_size
from .vectors import Params

# Metadata reads: answered from the wrapper itself (the same as the formed value's), nothing formed.
_METADATA = frozenset(
    [getattr(Tensor, n).__get__ for n in ("dtype", "shape", "device", "ndim", "requires_grad", "is_cuda")]
    + [getattr(Tensor, n).__get__ for n in ("layout", "is_leaf", "grad_fn", "is_sparse", "is_meta")]
    + [getattr(Tensor, n) for n in ("size", "dim", "numel", "is_floating_point", "is_complex", "stride")]
    + [getattr(Tensor, n) for n in ("element_size", "nelement", "is_contiguous", "__len__", "get_device")]
)


class FormedOnRead(Tensor):
    """A tensor whose value is formed by ``form()`` whenever an op reads it (module docstring).

    ``like``: a tensor of the value's shape and device; ``dtype``: the value's dtype."""

    @staticmethod
    def __new__(cls, like: Tensor, dtype: torch.dtype, form: Callable[[], Tensor]):
        t = Tensor._make_wrapper_subclass(cls, like.shape, dtype=dtype, device=like.device)
        t._form = form
        return t

    def value(self) -> Tensor:
        """The formed value (a plain tensor, no autograd)."""
        with torch.no_grad():
            return self._form()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        # a flat walk (an op's weights are direct arguments, or items of a list): pytree costs more per op
        args = tuple(_formed(a) for a in args)
        return func(*args, **{k: _formed(x) for k, x in (kwargs or {}).items()})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # reached only by ops that bypass __torch_function__: the same, at the dispatcher
        args, kwargs = tree_map_only(FormedOnRead, FormedOnRead.value, (args, kwargs or {}))
        return func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"FormedOnRead(shape={tuple(self.shape)}, dtype={self.dtype})"


def _formed(x):
    """``x`` with every ``FormedOnRead`` in it (itself, or in a list or tuple) replaced by its value."""
    if isinstance(x, FormedOnRead):
        return x.value()
    if isinstance(x, (list, tuple)) and any(isinstance(y, (FormedOnRead, list, tuple)) for y in x):
        return type(x)(_formed(y) for y in x)
    return x


def on_read(like: Tensor, dtype: torch.dtype, form: Callable[[], Tensor]) -> Tensor:
    """A ``FormedOnRead``, or, below one chunk, the value itself formed now: small tensors are many and
    cheap to hold, and the per-op cost of the wrapper would dominate theirs."""
    if like.numel() < chunk_size(like.device):
        with torch.no_grad():
            return form()
    return FormedOnRead(like, dtype, form)


def _v_chunk(v: Mapping[str, Tensor], name: str, start: int, stop: int) -> Tensor:
    """Flat fp32 ``v[name]`` over elements ``[start, stop)``; a ``StepView`` forms only that chunk."""
    if isinstance(v, StepView):
        return v.part(name, start, stop)
    return v[name].reshape(-1)[start:stop]


def _chunkwise(like: Tensor, dtype: torch.dtype, chunk: Callable[[int, int], Tensor]) -> Tensor:
    """A tensor shaped like ``like`` in ``dtype``, written ``chunk(start, stop)`` by flat chunk of
    ``step_view.chunk_size`` elements: no temporary larger than a chunk."""
    n = like.numel()
    out = torch.empty(n, dtype=dtype, device=like.device)
    size = chunk_size(like.device)
    for start in range(0, n, size):
        stop = min(start + size, n)
        out[start:stop] = chunk(start, stop)
    return out.reshape(like.shape)


def _stepped_form(theta: Tensor, v: Mapping[str, Tensor], name: str, step: float, dtype: torch.dtype):
    """``() -> theta + step * v[name]`` in ``dtype``, formed chunk by chunk into one output tensor. The
    ops of ``vectors.stepped_parameters`` on each element (``theta.float() + step * v``, cast to
    ``dtype``), so the same bits."""
    flat = theta.detach().reshape(-1)
    return lambda: _chunkwise(theta, dtype, lambda a, b: flat[a:b].float() + step * _v_chunk(v, name, a, b))


def direction_form(like: Tensor, v: Mapping[str, Tensor], name: str, dtype: torch.dtype):
    """``() -> v[name]`` in ``dtype``: a ``StepView``'s step formed chunk by chunk, never whole with its
    rule's temporaries (the forward-mode tangents, ``jvp.along``); a stored v read as it is."""
    if not isinstance(v, StepView):
        return lambda: v[name].to(dtype=dtype)
    return lambda: _chunkwise(like, dtype, lambda a, b: _v_chunk(v, name, a, b))


def _cast_form(t: Tensor) -> Callable[[], Tensor]:
    return lambda: t.detach().float()


def full_precision_casts(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{name: fp32 value of t}`` for every floating tensor of ``state``, each cast when read."""
    floating = {name: t for name, t in state.items() if t.is_floating_point()}
    return {name: on_read(t, torch.float32, _cast_form(t)) for name, t in floating.items()}


def stepped_state(
    params: Params, v: Mapping[str, Tensor], step: float, base: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """``{name: theta + step * v}`` for ``functional_call``, each value formed when read (module docstring).

    Without ``base``, in each parameter's dtype. With ``base`` (``truth.full_precision_state``: fp32 casts
    of every floating parameter and buffer), every entry of ``base``, the trainable ones stepped in fp32,
    so that a step below the rounding of a bf16/fp16 parameter is not lost."""
    out = dict(base or {})
    for name, p in params.items():
        dtype = torch.float32 if base is not None else p.dtype
        form = _stepped_form(p, v, name, step, dtype)
        out[name] = on_read(p, dtype, form)
    return out
