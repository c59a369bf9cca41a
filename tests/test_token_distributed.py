"""The token-level truth, measured change and second order on 2 real gloo ranks (DESIGN sections 9, 17, 20).

Run: ``PYTHONPATH=src pytest -q tests/test_token_distributed.py``.

One spawn runs every case, on the functions of the truth, the second order and ``measure_change`` with a
``ProbeCall`` built by hand (``EntropyProbe.run`` on an FSDP2 model with the token functional:
tests/test_fsdp_token.py).
Each rank holds its share of the E units (uneven, or none); the per-unit rows
are gathered in rank order and the ratio formed from all of them, so 2 ranks must equal one process
with every unit to 1e-6 relative (fp32 summation order only). Under FSDP2 (``fully_shard`` GPT-2) the
step is taken in place on the local shards and every rank's E is forwarded in lock-step; the caller's
parameter shards are bit-identical afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.distributed as dist
from core_support import random_batch, tiny_gpt2
from test_distributed import _launch

import entropy_probe as ep
from entropy_probe.change import measure_change
from entropy_probe.context import ProbeCall
from entropy_probe.distributed import ProcessGroupComm, SingleProcess
from entropy_probe.forecast import token_second_order_pass
from entropy_probe.passes import Passes
from entropy_probe.result import EvalState
from entropy_probe.sharded_passes import ShardedPasses
from entropy_probe.token_truth import measure_token_truth

REL = 1e-6
LR = 0.05
CFG = ep.ProbeConfig(lr=LR, microbatch_units=1, truth_alphas=(0.0, 0.5, 1.0), temperature=0.9)
TRUTH_FIELDS = ("delta_h", "se", "ess", "se_diff", "slope", "se_diff_forecast")


def _close(a: float, b: float, what: str) -> None:
    assert math.isfinite(a) and abs(a - b) <= REL * abs(b) + 1e-12, (
        f"{what}: 2 ranks {a!r} vs 1 process {b!r}"
    )


def _setup():
    model = tiny_gpt2(seed=0, vocab=11)
    gen = torch.Generator().manual_seed(4)
    v = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    E = random_batch(6, vocab=11, seed=21)
    s = torch.linspace(-1.0, 1.0, E.n_units, dtype=torch.float64)  # some per-unit prediction, for se_diff
    q = torch.linspace(2.0, -1.0, E.n_units, dtype=torch.float64)
    return model, v, E, s, q


def _share(E: ep.RolloutBatch, units: list[int]) -> ep.RolloutBatch | None:
    return E.select_units(units) if units else None


def _call(model, cfg, comm, passes=None) -> ProbeCall:
    params = dict(model.named_parameters())
    return ProbeCall(model, params, cfg, comm, passes or Passes(), None, LR, LR)


def _ddp_cases(rank: int, model, v, E, s, q) -> None:
    one, two = _call(model, CFG, SingleProcess()), _call(model, CFG, ProcessGroupComm())
    want = measure_token_truth(one, v, E, s, q)
    want_q = token_second_order_pass(one, E, v)  # (B_E,) every unit's q_n
    for shares in ([[0, 1, 2, 3], [4, 5]], [[0, 1, 2, 3, 4, 5], []]):  # uneven; a rank holding no unit
        mine = _share(E, shares[rank])
        got = measure_token_truth(two, v, mine, s, q)
        assert want.delta_h != 0 and got.delta_h_at[0] == 0.0
        for k in TRUTH_FIELDS:
            _close(getattr(got, k), getattr(want, k), f"truth.{k} {shares}")
        # the second order: this rank's q_n, formed from every rank's gathered Taylor rows
        got_q = two.comm.gather(token_second_order_pass(two, mine, v))  # (B_E,) rank order
        torch.testing.assert_close(got_q, want_q, rtol=REL, atol=REL * float(want_q.abs().max()))
        assert float(want_q.std()) > 0


def _fsdp_cases(rank: int, world: int, model, v, E, s, q) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    sharded = copy.deepcopy(model)
    for block in sharded.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    params = dict(sharded.named_parameters())
    v_local = {n: distribute_tensor(v[n], mesh, [Shard(0)]).to_local() for n in params}
    before = [p.to_local().clone() for p in params.values()]
    mine = E.select_units([[0, 1, 2, 3], [4, 5]][rank])
    cfg = dataclasses.replace(CFG, second_order=False)
    two = _call(sharded, cfg, ProcessGroupComm(), ShardedPasses())
    one = _call(model, cfg, SingleProcess())
    got = measure_token_truth(two, v_local, mine, s, q)
    want = measure_token_truth(one, v, E, s, q)
    assert all(torch.equal(a, p.to_local()) for a, p in zip(before, params.values()))
    for k in TRUTH_FIELDS:
        _close(getattr(got, k), getattr(want, k), f"fsdp truth.{k}")
    # measure_change after a real in-place move of both models (the same step)
    state = EvalState(mine, two.passes.tokens(sharded, params, mine, cfg))  # as the forecast pass keeps it
    state_ref = EvalState(E, one.passes.tokens(model, one.params, E, cfg))
    dist.barrier()
    with torch.no_grad():
        for n, p in params.items():
            p.to_local().add_(LR * v_local[n])
        for n, p in model.named_parameters():
            p.add_(LR * v[n])
    got_c = measure_change(two, state, s, LR)
    want_c = measure_change(one, state_ref, s, LR)
    assert want_c.delta_h != 0
    for k in ("delta_h", "se", "ess", "se_diff"):
        _close(getattr(got_c, k), getattr(want_c, k), f"fsdp measure_change.{k}")


def _probe_ddp_cases(rank: int) -> None:
    """Through ``EntropyProbe.run`` on a DDP model: entropy="token" with the second order and the truth,
    then ``measure_change`` after a real AdamW step; ranks hold uneven shares of U and E (one none)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from entropy_probe.toy import TabularPolicy, sample_enumerated

    policy = TabularPolicy(seed=3, scale=0.7)
    U, E = sample_enumerated(policy, 4, seed=11), sample_enumerated(policy, 4, group_size=3, seed=12)
    ddp = DDP(policy)
    opt = torch.optim.AdamW(policy.parameters(), lr=0.05)
    cfg = ep.ProbeConfig(entropy="token", second_order=True, truth_alphas=(0.5, 1.0), direction="sgd", lr=0.5)
    for u_split, e_split in (([[0, 1], [2, 3]], [[0, 1, 2], [3]]), ([[0], [1, 2, 3]], [[0, 1, 2, 3], []])):
        # v built under DDP (its all-reduce order differs from one process by fp32 rounding), then the same v
        # on both sides, so that the comparison isolates the distribution of E
        v = ep.EntropyProbe(ddp, opt, cfg).update_direction(_share(U, u_split[rank]))
        got = ep.EntropyProbe(ddp, opt, cfg).run(eval_batch=_share(E, e_split[rank]), direction=v, truth=True)
        want = ep.EntropyProbe(policy, opt, cfg).run(eval_batch=E, direction=v, truth=True)
        for k in ("delta_h1", "se_cond_e", "delta_h2", "se_forecast", "entropy"):
            _close(getattr(got, k), getattr(want, k), f"probe {k} {e_split}")
        for k in TRUTH_FIELDS:
            _close(getattr(got.truth, k), getattr(want.truth, k), f"probe truth.{k} {e_split}")
    # measure_change after the real step, on the shares of the last split
    opt.zero_grad()
    ddp(input_ids=U.input_ids, attention_mask=U.attention_mask).logsumexp(-1).mean().backward()
    cfg = ep.ProbeConfig(entropy="token", direction="optimizer-step")
    probe, single = ep.EntropyProbe(ddp, opt, cfg), ep.EntropyProbe(policy, opt, cfg)
    got = probe.run(eval_batch=_share(E, [[0, 1], [2, 3]][rank]), from_grad=True, truth=True)
    want = single.run(eval_batch=E, from_grad=True, truth=True)
    opt.step()
    got_c, want_c = probe.measure_change(got), single.measure_change(want)
    assert want_c.delta_h != 0 and abs(want_c.delta_h - want.truth.delta_h) < 1e-6
    for k in ("delta_h", "se", "ess", "se_diff"):
        _close(getattr(got_c, k), getattr(want_c, k), f"probe measure_change.{k}")


def _cases(rank: int, world: int) -> None:
    model, v, E, s, q = _setup()
    _ddp_cases(rank, model, v, E, s, q)
    _fsdp_cases(rank, world, model, v, E, s, q)
    _probe_ddp_cases(rank)


def test_token_truth_change_and_second_order_on_two_ranks_equal_one_process():
    _launch(_cases)
