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
``se``, ``ess``, ``slope``, ``measure_change``'s) is compared to ``REL * |value|`` (it came out
bit-identical: the same forwards in the same order).
Run: ``PYTHONPATH=src pytest -q tests/test_fsdp_token.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.distributed as dist
from core_support import random_batch, tiny_gpt2, tiny_llama
from test_distributed import _launch
from test_fsdp import _assert_same_state, _fully_shard, _raises, _snapshot, _trainer_backward

import entropy_probe as ep
from entropy_probe.engines import token_projections
from entropy_probe.from_grad import direction_from_grad

REL = 1e-6  # fp32 summation order only (module docstring)
TRUTH = ("delta_h", "se", "ess", "se_diff", "slope")
MEASURED = ("delta_h", "se", "ess", "se_diff")


def _close(a: float, b: float, what: str, terms: float = 0.0) -> None:
    """``|a - b| <= REL * (|b| + terms)``: ``terms``: the size of the parts ``b`` sums."""
    tol = REL * (abs(b) + terms)
    assert math.isfinite(a) and abs(a - b) <= tol, f"{what}: sharded {a!r} vs 1 process {b!r}, tol {tol:.1e}"


def _term_scales(ref, opt, cfg: ep.ProbeConfig, E: ep.RolloutBatch) -> tuple[float, float]:
    """``(S, S_g)``: the largest per-unit term of s_n and of any group's s_n^(g), from the reference's own
    pieces along the same v (module docstring): ``(|dN_n| + H |dD_n|) / Dbar`` for the ratio, ``|dN_n|``
    for the "sum" numerator."""
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
    """Every number the exact-H_t forecast reports: sharded == one process (module docstring)."""
    assert want.delta_h1 != 0 and got.n_eval_units == want.n_eval_units == 6
    lr_s, lr_g = want.first.lr * scales[0], want.first.lr * scales[1]
    for k in ("delta_h1", "se_cond_e", "se_jackknife"):
        _close(getattr(got, k), getattr(want, k), f"{what}: {k}", lr_s)
    _close(got.entropy, want.entropy, f"{what}: entropy")
    torch.testing.assert_close(got.per_unit, want.per_unit, rtol=0, atol=REL * scales[0])
    assert torch.equal(got.eval_unit_ids, want.eval_unit_ids)
    assert want.by_group is not None and got.by_group.keys() == want.by_group.keys()
    for g, (m, se) in want.by_group.items():
        _close(got.by_group[g][0], m, f"{what}: by_group[{g}]", lr_g)
        _close(got.by_group[g][1], se, f"{what}: by_group[{g}] se", lr_g)
    _close(sum(m for m, _ in got.by_group.values()), got.delta_h1, f"{what}: groups sum to delta_h1", lr_s)
    assert got.truth.delta_h_at[0] == 0.0 and want.truth.delta_h != 0  # alpha = 0: every weight exactly 1
    parts = [("truth", got.truth, want.truth)]
    if want.lookahead is not None:  # lookahead="always": the truth at alpha = 1 again, before the step
        parts.append(("lookahead", got.lookahead, want.lookahead))
    for name, a, b in parts:
        for k in TRUTH:  # se_diff involves s_n; the others only the forwards
            _close(getattr(a, k), getattr(b, k), f"{what}: {name}.{k}", lr_s if k == "se_diff" else 0.0)


def _fsdp_token_equals_one_process(rank: int, world: int, build, kinds) -> None:
    ref = build(seed=0, vocab=11)
    model = _fully_shard(copy.deepcopy(ref), world)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=0.02, weight_decay=0.01)
    warm = random_batch(2, vocab=11, seed=5)  # a first real step on both: Adam's state is not empty
    for m, o in ((model, opt), (ref, opt_ref)):
        _trainer_backward(m, warm)
        o.step()
        o.zero_grad(set_to_none=True)
    U = random_batch(4, vocab=11, seed=20)
    _trainer_backward(model, U.select_units([rank, rank + 2]))  # each rank its own rollouts
    for n, p in ref.named_parameters():
        p.grad = dict(model.named_parameters())[n].grad.full_tensor()  # bit-identical total gradient
    E = random_batch(6, vocab=11, seed=21)
    mine = E.select_units([[0, 1, 2, 3], [4, 5]][rank])  # uneven shares of E
    params = dict(model.named_parameters())
    grads = [p.grad for p in params.values()]
    for kind, functional in kinds:
        # one unit per forward on both sides: the same rows padded alike, the same logits
        cfg = ep.ProbeConfig(
            direction=kind, microbatch_units=1, truth_alphas=(0.0, 0.5, 1.0), temperature=0.9, **functional
        )
        o, o_ref = (None, None) if kind == "sgd" else (opt, opt_ref)  # "sgd": the plain gradient step
        cfg = dataclasses.replace(cfg, lr=0.02) if kind == "sgd" else cfg
        before = _snapshot(params, opt)
        got = ep.EntropyProbe(model, o, cfg).run(eval_batch=mine, from_grad=True, truth=True)
        _assert_same_state(before, _snapshot(params, opt))
        assert all(p.grad is g for p, g in zip(params.values(), grads)), "the caller's .grad objects replaced"
        want = ep.EntropyProbe(ref, o_ref, cfg).run(eval_batch=E, from_grad=True, truth=True)
        scales = _term_scales(ref, o_ref, cfg, E)
        _same_result(got, want, f"{build.__name__} {kind} {functional}", scales)
    # The real step on both (the same AdamW arithmetic on the shards), then the measured change.
    opt.step()
    opt_ref.step()
    before = _snapshot(params, opt)
    got_m = ep.EntropyProbe(model, opt, cfg).measure_change(got)
    want_m = ep.EntropyProbe(ref, opt_ref, cfg).measure_change(want)
    _assert_same_state(before, _snapshot(params, opt))
    assert want_m.delta_h != 0
    for k in MEASURED:  # se_diff: against lr * s_n
        terms = want.first.lr * scales[0] if k == "se_diff" else 0.0
        _close(getattr(got_m, k), getattr(want_m, k), f"{build.__name__} measure_change.{k}", terms)
    if build is tiny_gpt2:
        _unsupported(model, opt, mine, params)


def _unsupported(model, opt, E, params) -> None:
    """What FSDP2 still refuses with the exact-H_t reading: a ValueError naming the field, state untouched."""
    before = _snapshot(params, opt)
    for field in ("second_order", "keep_halves"):
        cfg = ep.ProbeConfig(entropy="token", direction="optimizer-step", **{field: True})
        _raises(lambda: ep.EntropyProbe(model, opt, cfg).run(eval_batch=E, from_grad=True), "FSDP2", field)
    _assert_same_state(before, _snapshot(params, opt))


TOKEN = {"entropy": "token"}
SUM = {"entropy": "sequence", "entropy_weighting": "sum"}  # the token pieces' numerator alone


def _cases(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    gpt2_kinds = [
        ("sgd", TOKEN),
        ("adam-preconditioned", TOKEN),
        ("optimizer-step", SUM),
        ("optimizer-step", {**TOKEN, "lookahead": "always"}),  # last: measure_change of this one
    ]
    _fsdp_token_equals_one_process(rank, world, tiny_gpt2, gpt2_kinds)  # tied embeddings
    _fsdp_token_equals_one_process(rank, world, tiny_llama, [("optimizer-step", TOKEN)])
    dist.barrier()


def test_fsdp2_token_entropy_equals_one_process():
    _launch(_cases)
