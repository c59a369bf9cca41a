"""FSDP2 (DESIGN section 17) on 2 real gloo ranks on the CPU (torch 2.13).

1. The probe on a real ``fully_shard`` GPT-2 and Llama (``entropy_probe.fsdp``): ``run(eval_batch=E,
   from_grad=True)`` after the trainer's backward (each rank its own rollouts, FSDP2 averages) equals
   one process on the unsharded model with the same weights, the same total ``.grad``, the same Adam
   state and all E units, to 1e-6 relative for delta_h1, se_cond_e, the jackknife, every s_n and the
   truth (in-place step of the shards, restored), for the three direction rules; after a real
   ``optimizer.step()`` on both, ``measure_change`` agrees to 1e-6. The caller's parameter, ``.grad``
   and optimizer state shards are bit-identical after every call (the ``.grad`` objects themselves
   are put back), also when the lock-step pass raises. The
   unsupported modes (update batch, given direction, second order, a rank without E, gradient
   sync off) raise a ValueError on every rank. FSDP1 cannot be built on the CPU ("FSDP needs a
   non-CPU accelerator device"), so its refusal is not tested here.
Run: ``PYTHONPATH=src pytest -q tests/test_fsdp.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.distributed as dist
from core_support import random_batch, tiny_gpt2, tiny_llama
from test_distributed import _launch

import entropy_probe as ep
from entropy_probe.logprobs import sequence_logprobs

REL = 1e-6  # the design's tolerance: sharded and whole differ by fp32 summation order only


def _close(a: float, b: float, what: str) -> None:
    assert math.isfinite(a) and abs(a - b) <= REL * abs(b), f"{what}: sharded {a!r} vs one process {b!r}"


# ---- the probe on a real FSDP2 model ------------------------------------------------------------------
def _fully_shard(model, world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers  # GPT-2, Llama
    for block in blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _trainer_backward(model, batch: ep.RolloutBatch) -> None:
    """A policy-gradient-like loss of this rank's rollouts; FSDP2 averages the gradient over ranks."""
    lp = sequence_logprobs(model, batch, 1.0, "token-mean")
    (-(batch.rewards - 0.5) * lp.seq).mean().backward()


def _snapshot(params: dict, optimizer) -> list[torch.Tensor]:
    """Every local tensor of the caller's state: parameter shards, .grad shards, optimizer state shards."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    out = [local(p.detach()).clone() for p in params.values()]
    out += [local(p.grad).clone() for p in params.values()]
    out += [local(x).clone() for st in optimizer.state.values() for x in st.values()]
    return out


def _assert_same_state(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert torch.equal(a, b), "the probe changed the caller's parameters, .grad or optimizer state"


def _fsdp_equals_one_process(rank: int, world: int, build) -> None:
    """from_grad and measure_change on an FSDP2 model == one process on the same weights, grad and E."""
    ref = build(seed=0, vocab=11)
    model = _fully_shard(copy.deepcopy(ref), world)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.02, weight_decay=0.01)
    # A first real step on both, so that Adam's state is not empty.
    warm = random_batch(2, vocab=11, seed=5)
    for m, o in ((model, opt), (ref, opt_ref)):
        _trainer_backward(m, warm)
        o.step()
        o.zero_grad(set_to_none=True)
    # The trainer's backward: each rank its own rollouts; the reference gets the same total gradient.
    U = random_batch(4, vocab=11, seed=20)
    _trainer_backward(model, U.select_units([rank, rank + 2]))
    sync_check = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    for u in ([0, 2], [1, 3]):  # what FSDP2 averaged, by autograd on the whole model
        _trainer_backward(ref, U.select_units(u))
    for n, p in ref.named_parameters():
        torch.testing.assert_close(sync_check[n], p.grad / world, rtol=1e-5, atol=1e-7)
        p.grad = sync_check[n].clone()  # bit-identical total gradient on both sides
    E = random_batch(6, vocab=11, seed=21)
    units = [[0, 1, 2, 3], [4, 5]][rank]  # uneven shares of E
    params = dict(model.named_parameters())
    for kind in ("sgd", "adam-preconditioned", "optimizer-step"):
        # one unit per forward in the truth, on both sides: the same rows padded alike, the same logits
        cfg = ep.ProbeConfig(
            entropy="sequence", direction=kind, microbatch_units=1, truth_alphas=(0.0, 0.5, 1.0)
        )
        # "sgd" is not AdamW's step: the plain gradient step, at the optimizer's lr, with no optimizer
        o, o_ref = (None, None) if kind == "sgd" else (opt, opt_ref)
        cfg = dataclasses.replace(cfg, lr=0.02) if kind == "sgd" else cfg
        before = _snapshot(params, opt)
        grads = [p.grad for p in params.values()]
        got = ep.EntropyProbe(model, o, cfg).run(eval_batch=E.select_units(units), from_grad=True, truth=True)
        _assert_same_state(before, _snapshot(params, opt))
        assert all(p.grad is g for p, g in zip(params.values(), grads)), (
            "the caller's .grad objects were replaced"
        )
        want = ep.EntropyProbe(ref, o_ref, cfg).run(eval_batch=E, from_grad=True, truth=True)
        assert want.delta_h1 != 0 and got.n_eval_units == want.n_eval_units == 6
        for k in ("delta_h1", "se_cond_e", "se_jackknife", "entropy"):
            _close(getattr(got, k), getattr(want, k), f"{kind}: {k}")
        torch.testing.assert_close(
            got.per_unit, want.per_unit, rtol=REL, atol=REL * float(want.per_unit.abs().max())
        )
        assert torch.equal(got.eval_unit_ids, want.eval_unit_ids)
        assert got.truth.delta_h_at[0] == 0.0 and want.truth.delta_h != 0  # alpha = 0: every weight exactly 1
        for k in ("delta_h", "se", "ess", "se_diff", "slope"):
            _close(getattr(got.truth, k), getattr(want.truth, k), f"{kind}: truth.{k}")
    # The real step on both (the same AdamW arithmetic on the shards), then the measured change.
    opt.step()
    opt_ref.step()
    before = _snapshot(params, opt)
    got_m, want_m = (
        ep.EntropyProbe(model, opt, cfg).measure_change(got),
        ep.EntropyProbe(ref, opt_ref, cfg).measure_change(want),
    )
    _assert_same_state(before, _snapshot(params, opt))
    assert want_m.delta_h != 0
    for k in ("delta_h", "se", "ess", "se_diff"):
        _close(getattr(got_m, k), getattr(want_m, k), f"measure_change: {k}")
    if build is tiny_gpt2:
        _unsupported(model, opt, E.select_units(units), U.select_units([rank]), params)


def _raises(fn, *words: str) -> None:
    try:
        fn()
    except ValueError as e:
        assert all(w in str(e) for w in words), str(e)
    else:
        raise AssertionError(f"no ValueError (expected one naming {words})")


def _unsupported(model, opt, E, U, params) -> None:
    """Every mode the FSDP2 probe does not support raises on every rank, before any pass."""
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(entropy="sequence", direction="optimizer-step"))
    _raises(lambda: probe.run(U, E), "FSDP2", "from_grad=True")
    _raises(lambda: probe.update_direction(U), "FSDP2", "from_grad=True")
    _raises(
        lambda: ep.EntropyProbe(model, opt, ep.ProbeConfig(second_order=True)).run(
            eval_batch=E, from_grad=True
        ),
        "second_order",
    )
    _raises(lambda: probe.run(eval_batch=None, from_grad=True), "every rank must pass an eval_batch")
    model.set_requires_gradient_sync(False)  # gradient accumulation without communication
    before = _snapshot(params, opt)
    _raises(lambda: probe.run(eval_batch=E, from_grad=True), "set_requires_gradient_sync")
    _assert_same_state(before, _snapshot(params, opt))
    model.set_requires_gradient_sync(True)
    bad = copy.deepcopy(E)  # a token id past the vocabulary: refused by name on every rank, before any pass
    bad.input_ids[-1, -1] = 50
    _raises(lambda: probe.run(eval_batch=bad, from_grad=True), "eval_batch.input_ids: row", "token id 50")
    _assert_same_state(before, _snapshot(params, opt))  # .grad put back when the pass raises


def _cases(rank: int, world: int) -> None:
    _fsdp_equals_one_process(rank, world, tiny_gpt2)  # tied embeddings
    _fsdp_equals_one_process(rank, world, tiny_llama)
    dist.barrier()


def test_fsdp2_from_grad_and_measure_change_equal_one_process():
    _launch(_cases)
