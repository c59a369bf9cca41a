"""The exact-H_t reading of E under FSDP2 (DESIGN sections 17 and 20) on 2 real gloo ranks on the CPU.

``ProbeConfig(entropy="token")`` and the sequence "sum" functional (the same token pieces) through
``EntropyProbe.run(eval_batch=E, from_grad=True, truth=True)`` on a real ``fully_shard`` GPT-2 (tied
embeddings) and Llama, after the trainer's backward (each rank its own rollouts, FSDP2 averages),
equal one process on the unsharded model with the same weights, the same total ``.grad``, the same
Adam state and all E units: ``delta_h1``, ``se_cond_e``, the jackknife, ``entropy`` (the trainers'
formula), every s_n, ``by_group``, the truth and the lookahead (the step taken in place on the shards
and undone), and, after a real ``optimizer.step()`` on both, ``measure_change``. The caller's
parameter, ``.grad`` and optimizer-state shards are bit-identical after every call. What FSDP2 still
does not support raises a ValueError naming the field, on every rank, before any pass.

The tolerance and its reasons: tests/test_fsdp.py (1e-6 relative to the terms summed; for the token-level
ratio those terms are the numerator's and denominator's parts, which cancel).
Run: ``PYTHONPATH=src pytest -q tests/test_fsdp_token.py``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from core_support import tiny_gpt2, tiny_llama
from test_distributed import _launch
from test_fsdp import _assert_same_state, _fsdp_equals_one_process, _raises, _snapshot

import entropy_probe as ep

TOKEN = {"entropy": "token", "temperature": 0.9}
SUM = {"entropy": "sequence", "entropy_weighting": "sum", "temperature": 0.9}  # the token pieces' numerator


def _unsupported(model, opt, E, U, params) -> None:
    """What FSDP2 still refuses with the exact-H_t reading: a ValueError naming the field, state untouched."""
    before = _snapshot(params, opt)
    for field in ("second_order", "keep_halves"):
        cfg = ep.ProbeConfig(entropy="token", direction="optimizer-step", **{field: True})
        _raises(lambda: ep.EntropyProbe(model, opt, cfg).run(eval_batch=E, from_grad=True), "FSDP2", field)
    _assert_same_state(before, _snapshot(params, opt))


def _cases(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    gpt2_cases = [
        ("sgd", TOKEN),
        ("adam-preconditioned", TOKEN),
        ("optimizer-step", SUM),
        ("optimizer-step", {**TOKEN, "lookahead": "always"}),  # last: measure_change of this one
    ]
    _fsdp_equals_one_process(rank, world, tiny_gpt2, gpt2_cases, _unsupported)  # tied embeddings
    _fsdp_equals_one_process(rank, world, tiny_llama, [("optimizer-step", TOKEN)])
    dist.barrier()


def test_fsdp2_token_entropy_equals_one_process():
    _launch(_cases)
