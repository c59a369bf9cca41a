"""FSDP2 (DESIGN section 17) on 2 real gloo ranks on the CPU (torch 2.13).

1. The probe on a real ``fully_shard`` GPT-2 and Llama (``entropy_probe.sharded_passes``):
   ``run(eval_batch=E, from_grad=True)`` after the trainer's backward (each rank its own rollouts, FSDP2
   averages) equals one process on the unsharded model with the same weights, the same total ``.grad``,
   the same Adam state and all E units, for the default functional: delta_h1, se_cond_e, the jackknife,
   the entropy, every s_n, by_group and the truth (in-place step of the shards, restored), for the three
   direction rules; after a real ``optimizer.step()`` on both, ``measure_change``. The caller's
   parameter, ``.grad`` and optimizer state shards are bit-identical after every call (the ``.grad``
   objects themselves are put back), also when the lock-step pass raises. The unsupported modes
   (update batch, given direction, second order, a rank without E, gradient sync off) raise a
   ValueError on every rank. FSDP1 cannot be built on the CPU ("FSDP needs a non-CPU accelerator
   device"), so its refusal is not tested here. Each functional by name: tests/test_fsdp_token.py.

Tolerance: ``REL = 1e-6`` relative to the terms a number is computed from. Both sides run the same
fp32 forward on the same parameter bits (FSDP2 all-gathers them exactly) and v is the same elementwise
rule on the same gradient bits; the gradient FSDP2 leaves is the average of W identical per-rank
gradients (exact in fp32 for W = 2). What differs is the order of the fp32 sums of each dot ``v . X``
(per shard, then added over ranks, instead of over the whole parameter): a few fp32 roundings (eps
6e-8) of the terms summed, so 1e-6 is about 16 eps of them. For the token-level ratio those terms are
not the result: ``s_n`` is about ``(dN_n - H dD_n) / Dbar``, and on these models the two parts cancel
to 1/20-1/250 of their size per unit (measured), so the roundings of dN and dD move s_n by more than
1e-6 of s_n itself (measured up to 1.7e-6 of max |s_n| and 2.8e-6 of delta_h1 on the Llama; the jvp
and backward engines differ by more in one process). Each quantity that is a mean or spread of s_n is
therefore compared to ``REL * (|value| + lr * S)``, with ``S = max_n (|dN_n| + H |dD_n|) / Dbar`` from
the reference's own pieces along the same v (per group for ``by_group``); the measured differences
used at most 1.6% of it. What does not involve s_n (entropy, the truth's and lookahead's ``delta_h``,
``se``, ``ess``, ``slope``, ``measure_change``'s) is compared to ``REL * |value|`` (with the token
pieces it came out bit-identical: the same forwards in the same order).
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
from entropy_probe.engines import token_projections, uses_token_pieces
from entropy_probe.from_grad import direction_from_grad
from entropy_probe.logprobs import sequence_logprobs

REL = 1e-6  # fp32 summation order only, relative to the terms summed (module docstring)
TRUTH = ("delta_h", "se", "ess", "se_diff", "slope")
# the default functional ("token") and, for the last direction, the sequence one (its own FSDP2 path)
DEFAULT = [("sgd", {}), ("adam-preconditioned", {}), ("optimizer-step", {"entropy": "sequence"})]


def _close(a: float, b: float, what: str, terms: float = 0.0) -> None:
    """``|a - b| <= REL * (|b| + terms)``: ``terms``: the size of the parts ``b`` sums."""
    tol = REL * (abs(b) + terms)
    assert math.isfinite(a) and abs(a - b) <= tol, f"{what}: sharded {a!r} vs 1 process {b!r}, tol {tol:.1e}"


def _term_scales(ref, opt, cfg: ep.ProbeConfig, E: ep.RolloutBatch) -> tuple[float, float]:
    """``(S, S_g)``: the largest per-unit part of s_n and of any group's s_n^(g) (module docstring), from the
    reference's own pieces along the same v: ``(|dN_n| + H |dD_n|) / Dbar`` for the token-level ratio,
    ``|dN_n|`` for the "sum" numerator; 0 for the "token-mean" functional, whose s_n is one dot."""
    if not uses_token_pieces(cfg):
        return 0.0, 0.0
    params = dict(ref.named_parameters())
    v = direction_from_grad(cfg.direction, params, opt, 0.02, True).v  # the rate the probe normalises by
    tp = token_projections(ref, params, E, v, cfg)
    n, d, _, _ = tp.pieces.unbind(1)
    size = tp.groups.abs()  # (B, 2, n_groups): |dN^(g)_n|, |dD^(g)_n|
    if cfg.entropy == "token":
        size = (size[:, 0] + n.sum() / d.sum() * size[:, 1]) / d.mean()  # (B, n_groups)
    else:
        size = size[:, 0]
    return float(size.sum(1).max()), float(size.max())


def _same_result(got: ep.ProbeResult, want: ep.ProbeResult, what: str, scales: tuple[float, float]) -> None:
    """Every number of the forecast, its by_group, truth and lookahead: sharded == one process."""
    assert want.delta_h1 != 0 and got.n_eval_units == want.n_eval_units == 6
    lr_s, lr_g = want.first.lr * scales[0], want.first.lr * scales[1]
    for k in ("delta_h1", "se_cond_e", "se_jackknife"):
        _close(getattr(got, k), getattr(want, k), f"{what}: {k}", lr_s)
    _close(got.entropy, want.entropy, f"{what}: entropy")
    largest = float(want.per_unit.abs().max())
    torch.testing.assert_close(got.per_unit, want.per_unit, rtol=0, atol=REL * (largest + scales[0]))
    assert torch.equal(got.eval_unit_ids, want.eval_unit_ids)
    # by_group (the backward engine's default): per-parameter partial dots summed per group and over
    # ranks; a group near 0 carries the rounding of the largest terms, hence the common scale
    assert want.by_group is not None and got.by_group.keys() == want.by_group.keys()
    largest = max(max(abs(m), se) for m, se in want.by_group.values())
    for g, (m, se) in want.by_group.items():
        for a, b in zip(got.by_group[g], (m, se)):
            assert abs(a - b) <= REL * (largest + lr_g), f"{what}: by_group[{g}]: sharded {a!r} vs {b!r}"
    _close(sum(m for m, _ in got.by_group.values()), got.delta_h1, f"{what}: groups sum to delta_h1", lr_s)
    assert got.truth.delta_h_at[0] == 0.0 and want.truth.delta_h != 0  # alpha = 0: every weight exactly 1
    parts = [("truth", got.truth, want.truth)]
    if want.lookahead is not None:  # the truth at alpha = 1 again, before the step
        parts.append(("lookahead", got.lookahead, want.lookahead))
    for name, a, b in parts:
        for k in TRUTH:  # se_diff involves s_n; the others only the forwards
            _close(getattr(a, k), getattr(b, k), f"{what}: {name}.{k}", lr_s if k == "se_diff" else 0.0)


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


def _fsdp_equals_one_process(rank: int, world: int, build, cases, unsupported=None) -> None:
    """from_grad and measure_change on an FSDP2 model == one process on the same weights, grad and E, for
    each ``(direction, other ProbeConfig fields)`` of ``cases``; measure_change after the last one."""
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
    mine = E.select_units([[0, 1, 2, 3], [4, 5]][rank])  # uneven shares of E
    params = dict(model.named_parameters())
    grads = [p.grad for p in params.values()]
    for kind, fields in cases:
        # one unit per forward in the truth, on both sides: the same rows padded alike, the same logits
        # engine="backward": the reference runs the per-unit reverse passes FSDP2's lock-step loop runs
        cfg = ep.ProbeConfig(
            direction=kind, microbatch_units=1, truth_alphas=(0.0, 0.5, 1.0), engine="backward", **fields
        )
        # "sgd" is not AdamW's step: the plain gradient step, at the optimizer's lr, with no optimizer
        o, o_ref = (None, None) if kind == "sgd" else (opt, opt_ref)
        cfg = dataclasses.replace(cfg, lr=0.02) if kind == "sgd" else cfg
        before = _snapshot(params, opt)
        got = ep.EntropyProbe(model, o, cfg).run(eval_batch=mine, from_grad=True, truth=True)
        _assert_same_state(before, _snapshot(params, opt))
        assert all(p.grad is g for p, g in zip(params.values(), grads)), "the caller's .grad objects replaced"
        want = ep.EntropyProbe(ref, o_ref, cfg).run(eval_batch=E, from_grad=True, truth=True)
        scales = _term_scales(ref, o_ref, cfg, E)
        _same_result(got, want, f"{build.__name__} {kind} {fields}", scales)
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
    for k in ("delta_h", "se", "ess", "se_diff"):  # se_diff: against lr * s_n
        terms = want.first.lr * scales[0] if k == "se_diff" else 0.0
        _close(getattr(got_m, k), getattr(want_m, k), f"{build.__name__} measure_change.{k}", terms)
    if unsupported is not None:
        unsupported(model, opt, mine, U.select_units([rank]), params)


def _raises(fn, *words: str) -> None:
    try:
        fn()
    except ValueError as e:
        assert all(w in str(e) for w in words), str(e)
    else:
        raise AssertionError(f"no ValueError (expected one naming {words})")


def _unsupported(model, opt, E, U, params) -> None:
    """Every mode the FSDP2 probe does not support raises on every rank, before any pass."""
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step"))
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
    _fsdp_equals_one_process(rank, world, tiny_gpt2, DEFAULT, _unsupported)  # tied embeddings
    _fsdp_equals_one_process(rank, world, tiny_llama, DEFAULT)
    dist.barrier()


def test_fsdp2_from_grad_and_measure_change_equal_one_process():
    _launch(_cases)
