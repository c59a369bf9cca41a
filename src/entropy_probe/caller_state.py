"""The probe never loses the caller's state.

The probe differentiates with ``torch.autograd.grad`` (``.grad`` is never written; the backward
engine's tensor hooks on the parameters live for one reverse pass and are removed in a ``finally``)
and applies steps with ``torch.func.functional_call`` (parameters are never written); the optimizer
state is only read.
(FSDP2 is the exception: its per-unit gradients arrive through ``backward()``, so ``fsdp.py`` sets the
caller's ``.grad`` objects aside and puts them back, untouched, also on an exception.)
What remains is guarded here, on success and on an exception alike: the train/eval flag of every
submodule and the CPU and CUDA RNG streams.

Inside the probe every module is in eval mode (no dropout: ``nn.Dropout`` modules and the functional
attention dropout that Hugging Face attention applies when its module is training), except the flag
of the layers that run Hugging Face gradient checkpointing (``gradient_checkpointing = True`` with a
non-reentrant checkpoint function): their own forward only decides, from ``self.training``, whether
to checkpoint, so turning them on keeps checkpointing active in the probe's backward passes while
every dropout below them stays off (docs/design.md section 11). Reentrant checkpointing
(``use_reentrant=True``) cannot serve ``torch.autograd.grad``; those layers stay in eval mode and run
without checkpointing, as before.

The forecast is of the dropout-free step. A model with active dropout (a dropout probability > 0 in
a module in train mode) takes a different, noisy step when it trains; the probe warns once per model.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager

import torch
from torch import nn

_warned_dropout: weakref.WeakSet = weakref.WeakSet()  # models already warned about dropout


def checkpointing_layers(model: nn.Module) -> list[nn.Module]:
    """Modules whose train flag switches on non-reentrant Hugging Face gradient checkpointing."""
    out = []
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is not True:
            continue
        func = getattr(m, "_gradient_checkpointing_func", None)
        if getattr(func, "keywords", {}).get("use_reentrant") is False:
            out.append(m)
    return out


def active_dropout(model: nn.Module) -> list[str]:
    """Names of the modules that apply dropout now: a dropout module, or an attention module with a
    float ``attention_dropout`` (Llama, Qwen2), with a probability > 0 and in train mode."""
    names = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        p = m.p if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "attention_dropout", 0.0)
        if isinstance(p, (int, float)) and p > 0:
            names.append(name or type(m).__name__)
    return names


def warn_dropout_once(model: nn.Module) -> None:
    """One RuntimeWarning per model if it trains with dropout: the forecast is of the dropout-free step."""
    if model in _warned_dropout:
        return
    names = active_dropout(model)
    if names:
        _warned_dropout.add(model)
        warnings.warn(
            f"EntropyProbe: the model has active dropout ({len(names)} module(s), e.g. "
            f"{names[0]!r}); "
            "the probe forecasts the dropout-free step (dropout off inside the probe), while the "
            "trainer's step is taken with dropout noise",
            RuntimeWarning,
            stacklevel=5,
        )


@contextmanager
def preserved_caller_state(model: nn.Module, keep_checkpointing: bool = True, warn_dropout: bool = True):
    """Run the body with dropout off (and, with ``keep_checkpointing``, gradient checkpointing on where
    the caller enabled it); restore every module's mode and the RNG streams afterwards.

    Sampling passes ``keep_checkpointing=False`` (a checkpointing model in train mode drops its KV
    cache) and ``warn_dropout=False`` (sampling is dropout-free by definition).
    """
    if warn_dropout:
        warn_dropout_once(model)
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    try:
        model.eval()
        if keep_checkpointing:
            for m in checkpointing_layers(model):
                m.training = True  # the layer's own flag only: its children (dropout) stay in eval
        with torch.enable_grad():
            yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
