"""FSDP2 (DESIGN section 17): what is proven, on 2 real gloo ranks on the CPU.

1. ``fully_shard`` runs on CPU gloo with torch 2.13, and the probe refuses a sharded model on every
   rank with a ValueError that says why and what to do (the passes are not written yet: see
   ``entropy_probe.sharded`` and docs/distributed.md).
2. The sharded arithmetic: every rank holds FSDP2's dim-0 shards (``sharded.shard_of``) of the
   gradient grad J_U, of the AdamW state and of each X_n, as FSDP2's reduce-scatter would deliver
   them; v is built on the shards by the probe's own ``build_direction`` (clipping through the
   all-reduced norm), and each s_n is a local partial dot product plus one all-reduce. v, the s_n,
   delta_h1 and the SE over E equal the one-process probe to 1e-6 relative. The X_n and grad J_U are
   computed in full on each rank and then sliced: this checks the arithmetic, not FSDP2's passes; the
   truth is not covered (its forward needs the passes).

Run: ``PYTHONPATH=src pytest -q tests/test_fsdp.py``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

import entropy_probe as ep
from core_support import TinyLM, random_batch, tiny_gpt2
from entropy_probe.direction import build_direction
from entropy_probe.distributed import ProcessGroupComm
from entropy_probe.engines import update_gradient
from entropy_probe.logprobs import sequence_logprobs
from entropy_probe.objectives import (UpdateTotals, advantages, entropy_gradient_coefficients,
                                      policy_gradient_coefficients)
from entropy_probe.sharded import clip_coefficient, global_dot, shard_of
from entropy_probe.statistics import conditional_variance, moments_update
from entropy_probe.vectors import grad_of
from test_distributed import _launch

REL = 1e-6  # the design's tolerance: sharded and whole differ by fp32 summation order only


def _close(a: float, b: float, what: str) -> None:
    assert math.isfinite(a) and abs(a - b) <= REL * abs(b), f"{what}: sharded {a!r} vs one process {b!r}"


def _refusal(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = tiny_gpt2(seed=0, vocab=11)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batch = random_batch(2, vocab=11, seed=1)
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)  # FSDP2 runs here
    try:
        ep.EntropyProbe(model)
    except ValueError as e:
        assert "fully_shard" in str(e) and "DistributedDataParallel" in str(e), str(e)
    else:
        raise AssertionError("a fully_shard model was not refused")


def _sharded_optimizer(model, optimizer, rank: int, world: int):
    """``(shard parameters, an AdamW over them holding the state shards)``: FSDP2's optimizer, locally."""
    shards, opt = {}, None
    for name, p in model.named_parameters():
        shards[name] = torch.nn.Parameter(shard_of(p.detach(), rank, world).clone())
    group = optimizer.param_groups[0]
    opt = torch.optim.AdamW(list(shards.values()), lr=group["lr"], betas=group["betas"], eps=group["eps"],
                            weight_decay=group["weight_decay"])
    for (name, p), s in zip(model.named_parameters(), shards.values()):
        st = optimizer.state[p]
        opt.state[s] = {"step": st["step"].clone(), "exp_avg": shard_of(st["exp_avg"], rank, world).clone(),
                        "exp_avg_sq": shard_of(st["exp_avg_sq"], rank, world).clone()}
    return shards, opt


def _arithmetic(rank: int, world: int) -> None:
    comm = ProcessGroupComm()
    torch.manual_seed(0)
    model = TinyLM(vocab=7, dim=8, seed=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    warm = random_batch(3, seed=5)
    model(warm.input_ids, warm.attention_mask).logsumexp(-1).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    U, E = random_batch(4, seed=11), random_batch(6, seed=12)
    for kind, clip in (("sgd", None), ("adam-preconditioned", None), ("optimizer-step", 0.05)):
        cfg = ep.ProbeConfig(direction=kind, max_grad_norm=clip, unconditional_se=False)
        probe = ep.EntropyProbe(model, optimizer, cfg)  # a plain module: one process, every unit
        v_ref = probe.update_direction(U)
        ref = probe.run(eval_batch=E, direction=v_ref)

        params = probe.parameters()
        coeff = policy_gradient_coefficients(U, advantages(U, None), cfg.loss_aggregation, UpdateTotals.of(U))
        grad_j = {n: g / U.n_units for n, g in update_gradient(model, params, U, coeff, cfg).items()}
        g_shards = {n: shard_of(g, rank, world).clone() for n, g in grad_j.items()}
        factor = clip_coefficient(comm, g_shards, clip) if kind == "optimizer-step" else 1.0
        shard_params, shard_opt = _sharded_optimizer(model, optimizer, rank, world)
        v = build_direction(kind, {n: g.mul_(factor) for n, g in g_shards.items()}, shard_params, shard_opt,
                            probe.lr, max_grad_norm=None).v
        for name, t in v.items():  # elementwise on the shards: the slice of the whole v
            torch.testing.assert_close(t, shard_of(v_ref[name], rank, world), rtol=REL, atol=REL * float(
                v_ref[name].abs().max()))

        s = []
        for mb in E.microbatches(1):  # X_n, sliced as FSDP2's reduce-scatter would hand it over
            lp = sequence_logprobs(model, mb.batch, cfg.temperature, cfg.entropy_weighting)
            a, e = entropy_gradient_coefficients(lp.weighted, mb.batch, cfg.x_estimator)
            x = grad_of((a * lp.seq + e * lp.weighted).sum(), params)
            s.append(global_dot(comm, {n: shard_of(g, rank, world) for n, g in x.items()}, v))
        s = torch.stack(s)  # (B_E,)
        torch.testing.assert_close(s.double(), ref.per_unit, rtol=REL, atol=REL * float(ref.per_unit.abs().max()))
        _close(probe.lr * float(s.double().mean()), ref.delta_h1, f"{kind}: delta_h1")
        _close(conditional_variance(moments_update(s), probe.lr)[1], ref.se_cond_e, f"{kind}: se_cond_e")


def _cases(rank: int, world: int) -> None:
    _refusal(rank, world)
    _arithmetic(rank, world)
    dist.barrier()


def test_fsdp2_is_refused_clearly_and_the_sharded_arithmetic_equals_one_process():
    _launch(_cases)
