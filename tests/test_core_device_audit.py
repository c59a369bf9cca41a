"""A CPU-side audit for device bugs: every tensor the probe's own code makes names its device.

Without a GPU a tensor made on the CPU by mistake cannot be told from one made on the model's device.
This test intercepts the factory functions (``torch.zeros``, ``arange``, ``tensor``, ...) called from
``entropy_probe``'s code during a probe call (a ``TorchFunctionMode``, as ``torch.device`` contexts
use) and fails on any call without ``device=``, except in the functions listed below, which make
host-side values on purpose. The batch.py bug of issue 13 (``torch.arange(n)`` on the CPU indexed by
a CUDA tensor) is the kind of call it catches. tests/test_cuda.py runs the real thing on a GPU.

Run: ``PYTHONPATH=src pytest -q tests/test_core_device_audit.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from core_support import random_batch, tiny_gpt2
from torch.overrides import TorchFunctionMode

import entropy_probe as ep
from entropy_probe.sampling import sample_rollouts

SRC = str(Path(ep.__file__).parent)
FACTORIES = {
    torch.tensor,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.arange,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.linspace,
    torch.eye,
}
# Host-side on purpose (function name: why).
HOST_SIDE = {
    "global_totals": "integer loss normalisers; the communicator moves them to the backend's device",
    "check_same": "int64 fingerprint hashes for one all_gather",
    "gather": "the gathered sizes (host integers)",
    "merged_moments": "float64 moments merged on the host, the same bits on every rank",
    "truth_result": "the alphas and deltas of the sweep, host floats for the slope",
    "score": "rewards from a Python reward function; sample_rollouts moves them to the model's device",
    "left_pad": "prompt token lists padded on the host, moved to the model's device in one copy",
    "_clip_coefficient": "only the empty case, a Python float",
    "eval_halves": "the half (0/1) of each E unit, read on the host to route each unit's X_n",
}


class FactoryAudit(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.offences: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = sys._getframe(1)
            while frame is not None and (
                not frame.f_code.co_filename.startswith(SRC) or frame.f_code.co_name.startswith("<")
            ):  # <genexpr>, <lambda>
                frame = frame.f_back
            if frame is not None and frame.f_code.co_name not in HOST_SIDE:
                where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} in {frame.f_code.co_name}"
                self.offences.append(f"torch.{func.__name__} without device= at {where}")
        return func(*args, **kwargs)


def test_every_tensor_the_probe_makes_names_its_device():
    model = tiny_gpt2(seed=0, vocab=11)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    U_cpu, E_cpu = random_batch(3, vocab=11, seed=1), random_batch(4, vocab=11, seed=2)
    audit = FactoryAudit()
    with audit:
        U, E = random_batch(3, vocab=11, seed=1), random_batch(4, vocab=11, seed=2)  # RolloutBatch itself
        for cfg in (
            ep.ProbeConfig(direction="optimizer-step", max_grad_norm=1.0, truth_alphas=(0.5, 1.0)),
            ep.ProbeConfig(direction="adam-preconditioned", engine="jvp"),
            ep.ProbeConfig(entropy="token", second_order=True, truth_alphas=(0.5, 1.0)),
        ):
            probe = ep.EntropyProbe(model, opt, cfg)
            probe.measure_change(probe.run(U, E, truth=True))
            probe.run(eval_batch=E, direction=probe.update_direction(U))
        sample_rollouts(
            model,
            [[1, 2], [3]],
            group_size=2,
            max_new_tokens=3,
            eos_token_id=0,
            reward_fn=lambda p, r: 1.0,
            seed=0,
        )
    offences = sorted(set(audit.offences))
    assert not offences, "\n".join(offences)
    assert U_cpu.n_units == U.n_units and E_cpu.n_units == E.n_units
