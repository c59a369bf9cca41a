"""The probe under torch.distributed DDP (DESIGN section 9): real processes, gloo, 2 ranks, CPU.

Run: ``PYTHONPATH=src python -m pytest -q -n 2 tests/test_distributed.py``.

Each test spawns its 2 ranks once (spawning costs seconds) and runs several cases on the same process
group. Inside a rank, the one-process reference is the same probe on the unwrapped module with every
unit (``communicator_for`` gives ``SingleProcess``), computed on the same machine from the same
batches, so the comparison isolates what distribution changes: summation order across ranks.
"""

from __future__ import annotations

import copy
import gc
import math
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from core_support import random_batch, tiny_llama
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
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=PG_TIMEOUT_S),
    )
    try:
        fn(rank, world)
    finally:
        # DDP objects caught in reference cycles would otherwise be collected after the process group is
        # gone, at interpreter exit, where their reducer's threads abort the rank ("terminate called
        # without an active exception", about one run in six of the DDP no-sync case).
        gc.collect()
        dist.destroy_process_group()


def _launch(fn, world: int = 2) -> None:
    """Run ``fn(rank, world)`` on ``world`` spawned ranks; an exception on a rank fails the test."""
    ctx = mp.start_processes(
        _rank_entry, args=(fn, _free_port(), world), nprocs=world, join=False, start_method="spawn"
    )
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
    assert abs(a - b) <= REL * abs(b), (
        f"{what}: 2 ranks {a!r} vs 1 process {b!r} (rel {abs(a - b) / abs(b):.2e})"
    )


def _close_vec(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Relative to the vector's norm: an element near 0 carries the fp32 error of the large ones."""
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = float((a - b).norm())
    assert err <= REL * float(b.norm()), f"{what}: |diff| {err:.3e} vs |ref| {float(b.norm()):.3e}"


def _assert_same_as_single(
    dist_r: ep.ProbeResult, ref: ep.ProbeResult, truth_ref: ep.TruthResult | None = None
) -> None:
    """The forecast against one process on all units; the truth against ``truth_ref``, the one-process
    truth along the *same* v (``run(direction=v)``); v itself is compared separately, to 1e-6.

    The truth differences two entropies of ~4 nats to give a change of ~1e-5 of that, so anything
    that moves the log-probs by one fp32 rounding moves the change by ~1e-3 relative: a last-bit
    difference of v (gradients summed in another order) flipping the rounding of theta + alpha eta v,
    or forwards over different microbatches (a rank's share batches other rows together; seen: 5e-4
    on the Llama case with 4 units per pass). Along the same v, with the same forward batches, what
    remains is the distribution of the truth's own sums, which is what this test is about."""
    for k in ("delta_h1", "se_cond_e", "se_jackknife", "se_total", "entropy"):
        if getattr(ref, k) is None:
            assert getattr(dist_r, k) is None, k
        else:
            _close(getattr(dist_r, k), getattr(ref, k), k)
    assert (dist_r.n_eval_units, dist_r.n_update_units) == (ref.n_eval_units, ref.n_update_units)
    assert torch.equal(dist_r.eval_unit_ids, ref.eval_unit_ids)  # rank order = the one-process order
    _close_vec(dist_r.per_unit, ref.per_unit, "per_unit s_n")
    for k in ("delta_h2", "se_delta_h2", "forecast", "se_forecast"):  # second order: float64 moments merged
        if getattr(ref, k) is None:
            assert getattr(dist_r, k) is None, k
        else:
            _close(getattr(dist_r, k), getattr(ref, k), k)
    if ref.per_unit_q is not None:
        _close_vec(dist_r.per_unit_q, ref.per_unit_q, "per_unit_q")
    assert (dist_r.by_group is None) == (ref.by_group is None)
    for g, (value, se) in (ref.by_group or {}).items():
        _close(dist_r.by_group[g][0], value, f"by_group[{g}]")
        _close(dist_r.by_group[g][1], se, f"by_group[{g}] se")
    if ref.update_influence is None:
        assert dist_r.update_influence is None and dist_r.var_update is None
    else:  # the jackknife over U: each rank's units' pieces, gathered in rank order
        assert torch.equal(dist_r.update_unit_ids, ref.update_unit_ids)
        _close_vec(dist_r.update_influence, ref.update_influence, "update_influence")
    if truth_ref is not None:
        t, rt = dist_r.truth, truth_ref
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
        (
            "even, adam-preconditioned, second order",
            ([0, 1], [2, 3]),
            ([0, 1], [2, 3]),
            ep.ProbeConfig(second_order=True),
            True,
        ),
        (
            "uneven 3+1, optimizer-step clipped, DAPO token-mean",
            ([0, 1, 2], [3]),
            ([0, 1, 2], [3]),
            ep.ProbeConfig(
                direction="optimizer-step",
                max_grad_norm=0.05,
                loss_aggregation="token-mean",
                truth_alphas=(0.5, 1.0),
                microbatch_units=2,
            ),
            True,
        ),
        (
            "E 4+0, U 1+3, sgd, Dr. GRPO (constant length), rloo",
            ([0], [1, 2, 3]),
            ([0, 1, 2, 3], []),
            ep.ProbeConfig(
                direction="sgd",
                lr=0.1,
                loss_aggregation="seq-mean-token-sum-norm",
                norm_length=9,
                advantage_estimator="rloo",
                entropy="sequence",
                entropy_weighting="sum",
                second_order=True,
            ),
            True,
        ),
        (
            "uneven 1+3, jvp engine (X half sums all-reduced)",
            ([0], [1, 2, 3]),
            ([0, 1, 2], [3]),
            ep.ProbeConfig(engine="jvp", microbatch_units=2),
            True,
        ),
        (  # the ratio's s_n need every rank's pieces: one gather, then each rank keeps its own
            "E 4+0, U 2+2, entropy='token', by_group (a rank without E units joins the gathers)",
            ([0, 1], [2, 3]),
            ([0, 1, 2, 3], []),
            ep.ProbeConfig(entropy="token", direction="sgd", lr=0.1),
            False,
        ),
    ]
    for name, u_split, e_split, cfg, truth in cases:
        probe = ep.EntropyProbe(ddp, optimizer, cfg)
        single = ep.EntropyProbe(policy, optimizer, cfg)
        assert probe.comm.world_size == 2 and single.comm.world_size == 1
        result = probe.run(_share(U, u_split[rank]), _share(E, e_split[rank]), truth=truth)
        ref = single.run(U, E, truth=truth)
        v_dist = probe.update_direction(_share(U, u_split[rank]))
        truth_ref = single.run(eval_batch=E, direction=v_dist, truth=True).truth if truth else None
        try:
            _assert_same_as_single(result, ref, truth_ref)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from e
        _same_on_every_rank(result)

        # v: bit-identical on every rank, equal to the one-process v to 1e-6
        v = _flat(v_dist)
        both = [torch.empty_like(v) for _ in range(world)]
        dist.all_gather(both, v)
        assert torch.equal(both[0], both[1]), f"case {name!r}: v differs between ranks"
        _close_vec(v, _flat(single.update_direction(U)), f"case {name!r}: v")

    # A fixed direction reused on a rank-split E (the "reuse U across E shards" pattern).
    cfg = ep.ProbeConfig(lr=0.05)
    v = ep.EntropyProbe(ddp, optimizer, cfg).update_direction(_share(U, [[0, 1, 2], [3]][rank]))
    result = ep.EntropyProbe(ddp, optimizer, cfg).run(
        eval_batch=_share(E, [[0], [1, 2, 3]][rank]), direction=v, truth=True
    )
    ref = ep.EntropyProbe(policy, optimizer, cfg).run(eval_batch=E, direction=v, truth=True)
    _assert_same_as_single(result, ref, ref.truth)
    assert result.se_total is None and result.n_update_units == 0


def test_units_split_over_two_ranks_give_the_one_process_result():
    _launch(_split_cases)


# ---- 2. no DDP gradient synchronisation inside the probe; Llama rotary buffers, broadcast_buffers ----
def _tiny_llama(seed: int):
    return tiny_llama(seed, vocab=32)  # rotary-embedding buffers: what broadcast_buffers would touch


def _random_rollouts(n_units: int, group_size: int, seed: int) -> ep.RolloutBatch:
    return random_batch(n_units, group_size, vocab=32, seed=seed, side="right")


def _counting_hook(state: dict, bucket):
    """DDP's own all-reduce, counted: every gradient synchronisation passes through here."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    state["calls"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def _ddp_backward(model: DDP, batch: ep.RolloutBatch) -> None:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # (N, T, V)
    logits.float().logsumexp(-1).mean().backward()


def _no_sync_cases(rank: int, world: int) -> None:
    model = _tiny_llama(seed=0)
    twin = copy.deepcopy(model)  # the same run without the probe
    assert any("rotary" in name for name, _ in model.named_buffers())
    probed = DDP(model, broadcast_buffers=True)
    reference = DDP(twin, broadcast_buffers=True)
    calls = {"calls": 0}
    probed.register_comm_hook(calls, _counting_hook)
    train1, train2 = _random_rollouts(2, 2, seed=100 + rank), _random_rollouts(2, 2, seed=200 + rank)

    _ddp_backward(probed, train1)
    _ddp_backward(reference, train1)
    synced = calls["calls"]
    assert synced > 0  # the hook sees DDP's synchronisation
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}

    U, E = _random_rollouts(3, 3, seed=1), _random_rollouts(4, 3, seed=2)
    u_units, e_units = [[0, 1], [2]][rank], [[0], [1, 2, 3]][rank]
    # one unit per forward: the truth's forwards then batch the same rows on 2 ranks as in 1 process
    cfg = ep.ProbeConfig(lr=1e-3, direction="sgd", microbatch_units=1)
    probe = ep.EntropyProbe(probed, None, cfg)
    result = probe.run(U.select_units(u_units), E.select_units(e_units), truth=True)
    v_dist = probe.update_direction(U.select_units(u_units))
    assert calls["calls"] == synced, "a probe backward triggered DDP's gradient all-reduce"
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) and torch.equal(p.detach(), params[n]), n

    # The next DDP step sees exactly what it would have seen without the probe.
    _ddp_backward(probed, train2)
    _ddp_backward(reference, train2)
    assert calls["calls"] > synced
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), f"{n}: .grad after the probe differs from DDP without it"

    # And the Llama result is the one-process result.
    single = ep.EntropyProbe(model, None, cfg)
    ref = single.run(U, E, truth=True)
    _assert_same_as_single(result, ref, single.run(eval_batch=E, direction=v_dist, truth=True).truth)
    _same_on_every_rank(result)


def test_probe_never_syncs_ddp_gradients_and_handles_llama_rotary_buffers():
    _launch(_no_sync_cases)


# ---- 3. disagreeing ranks raise on every rank; collectives are bounded by the timeout ---------------
class _TableWithBias(nn.Module):
    """The tabular policy plus a second parameter (a logit bias), so ranks can differ in their count."""

    def __init__(self):
        super().__init__()
        self.policy = TabularPolicy(seed=5)
        self.bias = nn.Parameter(torch.zeros(self.policy.vocab_size))

    def forward(self, input_ids, attention_mask, position_ids=None):
        return self.policy(input_ids, attention_mask, position_ids) + self.bias  # (N, T, V)


def _expect_raise(rank: int, call, match_by_rank: dict[int, str], case: str) -> None:
    try:
        with pytest.raises(ValueError, match=match_by_rank[rank]):
            call()
    except BaseException as e:  # pytest's Failed is a BaseException
        raise AssertionError(f"rank {rank}, case {case!r}: {e}") from e


def _disagreement_cases(rank: int, world: int) -> None:
    model = _TableWithBias()
    ddp = DDP(model)
    U = sample_enumerated(model.policy, n_units=2, seed=rank)
    E = sample_enumerated(model.policy, n_units=2, seed=10 + rank)
    cfg = ep.ProbeConfig(lr=0.1)
    v = ep.EntropyProbe(ddp, None, cfg).update_direction(U)
    both = lambda msg: {0: msg, 1: msg}  # noqa: E731

    # different configs
    _expect_raise(
        rank,
        lambda: ep.EntropyProbe(ddp, None, ep.ProbeConfig(lr=0.1 * (1 + rank))).run(U, E),
        both("disagree on ProbeConfig"),
        "config",
    )
    # one rank forecasts U, the other a given direction; or one asks for the truth
    _expect_raise(
        rank,
        lambda: ep.EntropyProbe(ddp, None, cfg).run(
            U if rank == 0 else None, E, direction=None if rank == 0 else v
        ),
        both("disagree on the call"),
        "mode",
    )
    _expect_raise(
        rank,
        lambda: ep.EntropyProbe(ddp, None, cfg).run(U, E, truth=rank == 1),
        both("disagree on the call"),
        "truth",
    )
    # a direction of a different shape on rank 1: it names the tensor, rank 0 names rank 1
    bad = dict(v, bias=torch.zeros(7)) if rank == 1 else v
    _expect_raise(
        rank,
        lambda: ep.EntropyProbe(ddp, None, cfg).run(eval_batch=E, direction=bad),
        {0: r"rank\(s\) \[1\] of 2 failed their input checks", 1: r"direction\['bias'\] has shape"},
        "direction shape",
    )
    # directions of the same shape but different values
    _expect_raise(
        rank,
        lambda: ep.EntropyProbe(ddp, None, cfg).run(
            eval_batch=E, direction={n: t * (1 + rank) for n, t in v.items()}
        ),
        both("disagree on direction"),
        "direction values",
    )
    # different numbers of trainable parameters
    model.bias.requires_grad_(rank == 0)
    _expect_raise(
        rank,
        lambda: ep.EntropyProbe(ddp, None, cfg).run(U, E),
        both("disagree on trainable parameters"),
        "parameters",
    )
    _expect_raise(
        rank,
        lambda: ep.EntropyProbe(ddp, None, cfg).update_direction(U),
        both("disagree on trainable parameters"),
        "parameters, update_direction",
    )
    model.bias.requires_grad_(True)
    # no rank holds E units: every rank says so
    _expect_raise(
        rank,
        lambda: ep.EntropyProbe(ddp, None, cfg).run(U, None),
        both("no rank holds any evaluation unit"),
        "no E",
    )

    # After all that the process group is healthy and an agreeing call works.
    _same_on_every_rank(ep.EntropyProbe(ddp, None, cfg).run(U, E, truth=True))

    # FSDP2 supports from_grad only (tests/test_fsdp.py): an update batch is refused clearly, on every rank.
    from torch.distributed.fsdp import fully_shard

    with pytest.raises(ValueError, match="FSDP2 model: only run"):
        ep.EntropyProbe(fully_shard(copy.deepcopy(model.policy)), None, cfg).run(U, E)

    # A rank that never joins: the other's first collective ends at the group's timeout, not in a hang.
    short = dist.new_group(timeout=timedelta(seconds=2))
    lonely = DDP(copy.deepcopy(model), process_group=short)
    if rank == 0:
        with pytest.raises(RuntimeError, match="(?i)timed out"):  # gloo: "Timed out waiting 2000ms for recv"
            ep.EntropyProbe(lonely, None, cfg).run(U, E)
    dist.barrier()


def test_disagreeing_ranks_raise_on_every_rank_instead_of_hanging():
    _launch(_disagreement_cases)
