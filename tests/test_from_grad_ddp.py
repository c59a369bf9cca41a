"""``from_grad`` and ``measure_change`` under DDP (DESIGN section 11): real gloo processes, 2 ranks, CPU.

DDP's backward leaves the rank-averaged gradient on every rank; the probe takes v from it on each
rank (no all-reduce of v), the ranks combine their E units, and the result equals one process holding
every E unit with the same ``.grad`` (1e-6 relative: summation order only). Ranks holding different
gradients raise on every rank instead of reporting different forecasts.
Run: ``PYTHONPATH=src python -m pytest -q tests/test_from_grad_ddp.py``.
"""

from __future__ import annotations

import pytest
import torch
from core_support import TinyLM, hand_objective, hand_token_logprobs, numpy_advantages, random_batch
from test_distributed import _close, _launch
from torch.nn.parallel import DistributedDataParallel as DDP

import entropy_probe as ep


def _ranks_from_grad(rank: int, world: int) -> None:
    torch.manual_seed(0)
    ddp = DDP(TinyLM(seed=3))
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2, weight_decay=0.05)
    cfg = ep.ProbeConfig(direction="optimizer-step")
    update = random_batch(4, seed=50 + rank)  # each rank's own share of U
    loss = -hand_objective(
        hand_token_logprobs(ddp, update), update, numpy_advantages(update, "grpo"), "seq-mean-token-mean"
    )
    loss.backward()  # DDP averages .grad over the ranks
    eval_all = random_batch(6, seed=11)
    mine = eval_all.select_units(list(range(3 * rank, 3 * rank + 3)))
    probe, single = ep.EntropyProbe(ddp, opt, cfg), ep.EntropyProbe(ddp.module, opt, cfg)
    r = probe.run(eval_batch=mine, from_grad=True, truth=True)
    ref = single.run(eval_batch=eval_all, from_grad=True, truth=True)
    assert r.se_total is None and r.n_eval_units == 6
    for name in ("delta_h1", "se_cond_e", "se_jackknife", "entropy"):
        _close(getattr(r, name), getattr(ref, name), name)
    _close(r.truth.delta_h, ref.truth.delta_h, "truth.delta_h")
    opt.step()
    measured, measured_ref = probe.measure_change(r), single.measure_change(ref)
    _close(measured.delta_h, measured_ref.delta_h, "measured.delta_h")
    _close(measured.se, measured_ref.se, "measured.se")
    assert abs(measured.delta_h - ref.truth.delta_h) < 1e-6  # the real step is the forecast's step

    opt.zero_grad()
    loss = -hand_objective(
        hand_token_logprobs(ddp, update), update, numpy_advantages(update, "grpo"), "seq-mean-token-mean"
    )
    loss.backward()
    if rank == 1:  # a rank whose gradient is not the average the others hold
        ddp.module.head.bias.grad.mul_(1.001)
    with pytest.raises(ValueError, match="the ranks disagree on gradient"):
        probe.run(eval_batch=mine, from_grad=True)


def test_from_grad_two_ranks_equal_one_process_and_disagreeing_grads_raise():
    _launch(_ranks_from_grad)
