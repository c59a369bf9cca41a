"""The probe under torch.distributed DDP (DESIGN section 9): real processes, gloo, 2 ranks, CPU.

Run: ``PYTHONPATH=src python -m pytest -q -n 2 tests/test_distributed.py``.

Each test spawns its 2 ranks once (spawning costs seconds) and runs several cases on the same process
group. Inside a rank, the one-process reference is the same probe on the unwrapped module with every
unit (``communicator_for`` gives ``SingleProcess``), computed on the same machine from the same
batches, so the comparison isolates what distribution changes: summation order across ranks.
"""

from __future__ import annotations

import copy
import math
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import entropy_probe as ep
from entropy_probe.toy import TabularPolicy, sample_enumerated

REL = 1e-6  # the design's tolerance: 1 vs 2 processes differ only by fp32 summation order
PG_TIMEOUT_S = 30  # every collective of the probe is bounded by the process group's timeout
TEST_DEADLINE_S = 150  # a hung rank fails the test instead of the suite


# ---- launching ranks ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, fn, port: int, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=PG_TIMEOUT_S))
    try:
        fn(rank, world)
    finally:
        dist.destroy_process_group()


def _launch(fn, world: int = 2) -> None:
    """Run ``fn(rank, world)`` on ``world`` spawned ranks; an exception on a rank fails the test."""
    ctx = mp.start_processes(_rank_entry, args=(fn, _free_port(), world), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TEST_DEADLINE_S
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException with the rank's traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the distributed ranks did not finish within {TEST_DEADLINE_S} s (a hang)")


# ---- comparisons ----------------------------------------------------------------------------------
def _close(a: float, b: float, what: str) -> None:
    assert a is not None and b is not None, what
    assert math.isfinite(a) and math.isfinite(b), (what, a, b)
    assert abs(a - b) <= REL * abs(b), f"{what}: 2 ranks {a!r} vs 1 process {b!r} (rel {abs(a - b) / abs(b):.2e})"


def _close_vec(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Relative to the vector's norm: an element near 0 carries the fp32 error of the large ones."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float((a - b).norm())
    assert err <= REL * float(b.norm()), f"{what}: |diff| {err:.3e} vs |ref| {float(b.norm()):.3e}"


def _assert_same_as_single(dist_r: ep.ProbeResult, ref: ep.ProbeResult, truth: bool) -> None:
    for k in ("delta_h1", "se_cond_e", "se_jackknife", "se_total", "entropy"):
        if getattr(ref, k) is None:
            assert getattr(dist_r, k) is None, k
        else:
            _close(getattr(dist_r, k), getattr(ref, k), k)
    assert (dist_r.n_eval_units, dist_r.n_update_units) == (ref.n_eval_units, ref.n_update_units)
    assert torch.equal(dist_r.eval_unit_ids, ref.eval_unit_ids)  # rank order = the one-process order
    _close_vec(dist_r.per_unit, ref.per_unit, "per_unit s_n")
    if truth:
        t, rt = dist_r.truth, ref.truth
        for k in ("delta_h", "se", "ess", "se_diff"):
            _close(getattr(t, k), getattr(rt, k), f"truth.{k}")
        _close_vec(torch.tensor(t.delta_h_at), torch.tensor(rt.delta_h_at), "truth.delta_h_at")


def _same_on_every_rank(result: ep.ProbeResult) -> None:
    """Every rank returns bit-identical numbers (compared through an all_gather of the results)."""
    mine = (result.to_dict(), result.per_unit.tolist(), result.eval_unit_ids.tolist())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    assert all(x == everyone[0] for x in everyone), "the ranks returned different results"


def _flat(v: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in v.values()])  # (P,)


def _share(batch: ep.RolloutBatch, units: list[int]) -> ep.RolloutBatch | None:
    return batch.select_units(units) if units else None


# ---- 1. the same units over 2 ranks == 1 process ---------------------------------------------------
def _split_cases(rank: int, world: int) -> None:
    torch.manual_seed(0)
    policy = TabularPolicy(seed=3, scale=0.7)
    U = sample_enumerated(policy, n_units=4, group_size=4, seed=11)
    E = sample_enumerated(policy, n_units=4, group_size=3, seed=12)
    ddp = DDP(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.05, weight_decay=0.01)
    # A real Adam step first (through DDP), so that "optimizer-step" and the preconditioner see state.
    ddp(input_ids=U.input_ids, attention_mask=U.attention_mask).logsumexp(-1).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    cases = [
        # (name, U units of rank 0 / rank 1, E units of rank 0 / rank 1, config, truth)
        ("even, adam-preconditioned", ([0, 1], [2, 3]), ([0, 1], [2, 3]), ep.ProbeConfig(), True),
        ("uneven 3+1, optimizer-step clipped, DAPO token-mean", ([0, 1, 2], [3]), ([0, 1, 2], [3]),
         ep.ProbeConfig(direction="optimizer-step", max_grad_norm=0.05, loss_aggregation="token-mean",
                        truth_alphas=(0.5, 1.0), microbatch_units=2), True),
        ("E 4+0, U 1+3, sgd, Dr. GRPO (global max length), rloo", ([0], [1, 2, 3]), ([0, 1, 2, 3], []),
         ep.ProbeConfig(direction="sgd", lr=0.1, loss_aggregation="seq-mean-token-sum-norm",
                        advantage_estimator="rloo", entropy_weighting="sum"), True),
    ]
    for name, u_split, e_split, cfg, truth in cases:
        probe = ep.EntropyProbe(ddp, optimizer, cfg)
        single = ep.EntropyProbe(policy, optimizer, cfg)
        assert probe.comm.world_size == 2 and single.comm.world_size == 1
        result = probe.run(_share(U, u_split[rank]), _share(E, e_split[rank]), truth=truth)
        ref = single.run(U, E, truth=truth)
        try:
            _assert_same_as_single(result, ref, truth)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from e
        _same_on_every_rank(result)

        # v: bit-identical on every rank, equal to the one-process v to 1e-6
        v = _flat(probe.update_direction(_share(U, u_split[rank])))
        both = [torch.empty_like(v) for _ in range(world)]
        dist.all_gather(both, v)
        assert torch.equal(both[0], both[1]), f"case {name!r}: v differs between ranks"
        _close_vec(v, _flat(single.update_direction(U)), f"case {name!r}: v")

    # A fixed direction reused on a rank-split E (the "reuse U across E shards" pattern).
    cfg = ep.ProbeConfig(lr=0.05)
    v = ep.EntropyProbe(ddp, optimizer, cfg).update_direction(_share(U, [[0, 1, 2], [3]][rank]))
    result = ep.EntropyProbe(ddp, optimizer, cfg).run(eval_batch=_share(E, [[0], [1, 2, 3]][rank]), direction=v,
                                                     truth=True)
    ref = ep.EntropyProbe(policy, optimizer, cfg).run(eval_batch=E, direction=v, truth=True)
    _assert_same_as_single(result, ref, truth=True)
    assert result.se_total is None and result.n_update_units == 0


def test_units_split_over_two_ranks_give_the_one_process_result():
    _launch(_split_cases)
