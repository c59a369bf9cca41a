"""The probe never loses the caller's state.

The probe differentiates with ``torch.autograd.grad`` (``.grad`` is never written) and applies steps
with ``torch.func.functional_call`` (parameters are never written); the optimizer state is only read.
What remains is guarded here, on success and on an exception alike: the train/eval flag of every
submodule (the probe runs in eval mode, so dropout adds no noise) and the CPU and CUDA RNG streams.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def preserved_caller_state(model: nn.Module):
    """Run the body in eval mode; restore every module's mode and the RNG streams afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
