"""The probe on a GPU: every tensor it makes lives on the model's device (DESIGN section 17).

Runs wherever CUDA exists and is skipped otherwise. ``ENTROPY_PROBE_TEST_DEVICE=cpu`` runs the same
tests on the CPU (the comparisons are then CPU against CPU: it checks the test code, not the device).
Each test compares the device run with the same computation on the CPU: equal to fp32 summation order.

Run: ``PYTHONPATH=src pytest -q tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from core_support import random_batch, tiny_gpt2

import entropy_probe as ep
from entropy_probe.sampling import sample_rollouts
from entropy_probe.toy import TabularPolicy, default_reward, sample_enumerated

DEVICE = os.environ.get("ENTROPY_PROBE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
VOCAB = 11
# fp32 on two devices: the same arithmetic in another summation order (and other kernels): ~1e-6
# relative per op, a few hundred ops deep. The truth differences two entropies of ~2 nats to give a
# change of ~1e-3 nats, so its relative error is ~1e3 times larger (see docs/distributed.md).
REL, REL_TRUTH = 1e-4, 1e-2


@pytest.fixture(autouse=True)
def _exact_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would differ from the CPU by ~1e-3
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def _on(device: str, *tensors: torch.Tensor | None) -> None:
    for t in tensors:
        if t is not None:
            assert t.device.type == torch.device(device).type, t.device


def test_rollout_batch_structure_on_the_device():
    cpu = random_batch(5, group_size=[2, 3, 2, 4, 3], vocab=VOCAB, seed=3)
    dev = cpu.to(DEVICE)
    _on(DEVICE, dev.unit_ids, dev.unit_index, dev.unit_sizes, dev._row_order)
    for name in ("unit_ids", "unit_index", "unit_sizes"):
        assert torch.equal(getattr(dev, name).cpu(), getattr(cpu, name)), name
    for mb_dev, mb_cpu in zip(dev.microbatches(2), cpu.microbatches(2)):
        _on(DEVICE, mb_dev.rows, mb_dev.batch.input_ids, mb_dev.batch.unit_index)
        assert torch.equal(mb_dev.rows.cpu(), mb_cpu.rows)
        assert torch.equal(mb_dev.batch.input_ids.cpu(), mb_cpu.batch.input_ids)
    assert dev.to(DEVICE) is dev  # already there: no copy, no re-validation


def _trained_pair(seed: int = 0):
    """The same GPT-2 and AdamW (with state) on the CPU and on the device."""
    model = tiny_gpt2(seed=seed, vocab=VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = random_batch(3, vocab=VOCAB, seed=9)
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.logsumexp(
        -1
    ).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    dev_model = copy.deepcopy(model).to(DEVICE)
    dev_opt = torch.optim.AdamW(dev_model.parameters(), lr=1e-2)
    dev_opt.load_state_dict(opt.state_dict())  # moves the moments to the parameters' device
    return (model, opt), (dev_model, dev_opt)


def _close(a: float, b: float, rel: float, what: str) -> None:
    assert math.isfinite(a) and math.isfinite(b), (what, a, b)
    assert abs(a - b) <= rel * abs(b), f"{what}: device {a!r} vs cpu {b!r}"


@pytest.mark.parametrize(
    "cfg",
    [
        ep.ProbeConfig(direction="optimizer-step", max_grad_norm=0.5, truth_alphas=(0.5, 1.0)),
        ep.ProbeConfig(direction="adam-preconditioned", engine="jvp", microbatch_units=2),
        ep.ProbeConfig(entropy="sequence", direction="sgd", lr=0.05, entropy_weighting="sum"),
    ],
    ids=["optimizer-step", "jvp", "sgd"],
)
def test_run_on_the_device_equals_the_cpu(cfg):
    (model, opt), (dev_model, dev_opt) = _trained_pair()
    U, E = random_batch(3, vocab=VOCAB, seed=1), random_batch(6, vocab=VOCAB, seed=2)
    ref = ep.EntropyProbe(model, opt, cfg).run(U, E, truth=True)
    # The batches are given on the CPU: the probe moves them to the model's device.
    out = ep.EntropyProbe(dev_model, dev_opt, cfg).run(U, E.to(DEVICE), truth=True)
    for k in ("delta_h1", "se_cond_e", "se_jackknife", "entropy"):
        _close(getattr(out, k), getattr(ref, k), REL, k)
    if ref.se_total is not None:
        _close(out.se_total, ref.se_total, REL, "se_total")
    torch.testing.assert_close(
        out.per_unit, ref.per_unit, rtol=REL, atol=REL * float(ref.per_unit.abs().max())
    )
    _close(out.truth.delta_h, ref.truth.delta_h, REL_TRUTH, "truth.delta_h")
    _close(out.truth.se, ref.truth.se, REL_TRUTH, "truth.se")

    # A given direction (from the device) projects the same.
    v = ep.EntropyProbe(dev_model, dev_opt, cfg).update_direction(U)
    _on(DEVICE, *v.values())
    again = ep.EntropyProbe(dev_model, dev_opt, cfg).run(eval_batch=E, direction=v)
    _close(again.delta_h1, out.delta_h1, REL, "delta_h1 along the given v")


def test_sample_rollouts_on_the_device():
    model = tiny_gpt2(seed=0, vocab=VOCAB).to(DEVICE)
    prompts = [[1, 2, 3], [4, 5], [6]]
    batch = sample_rollouts(
        model,
        prompts,
        group_size=3,
        max_new_tokens=4,
        eos_token_id=0,
        reward_fn=lambda p, r: float(len(r)),
        seed=5,
    )
    _on(
        DEVICE,
        batch.input_ids,
        batch.attention_mask,
        batch.response_mask,
        batch.group_ids,
        batch.rewards,
        batch.unit_index,
    )
    again = sample_rollouts(
        model,
        prompts,
        group_size=3,
        max_new_tokens=4,
        eos_token_id=0,
        reward_fn=lambda p, r: float(len(r)),
        seed=5,
    )
    assert torch.equal(batch.input_ids, again.input_ids)  # seeded on the device too
    # The plain loop (a module without generate) and the probe on its batch.
    policy = TabularPolicy(seed=0).to(DEVICE)
    loop = sample_rollouts(
        policy,
        [list(p) for p in policy.prompts],
        group_size=4,
        max_new_tokens=3,
        eos_token_id=0,
        reward_fn=default_reward,
        seed=1,
    )
    _on(DEVICE, loop.input_ids, loop.group_ids, loop.unit_index)
    E = sample_enumerated(policy.cpu(), n_units=4, seed=2).to(DEVICE)
    policy.to(DEVICE)
    r = ep.EntropyProbe(policy, config=ep.ProbeConfig(lr=1e-2, direction="sgd")).run(loop, E, truth=True)
    assert math.isfinite(r.delta_h1) and math.isfinite(r.truth.delta_h)


def test_demo_first_step_on_the_device():
    from entropy_probe.demo.config import DemoConfig
    from entropy_probe.demo.task import SortingTask
    from entropy_probe.demo.train import build_model, rl_step, supervised_warmup

    cfg = DemoConfig(
        steps=1,
        layers=1,
        width=16,
        heads=2,
        n_digits=4,
        update_prompts=4,
        eval_prompts=4,
        measure_prompts=8,
        group_size=4,
        warmup_steps=2,
        warmup_batch=8,
        device=DEVICE,
    )
    task = SortingTask(n_digits=cfg.n_digits)
    torch.manual_seed(0)
    model = build_model(cfg, task).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    supervised_warmup(model, optimizer, task, cfg, gen)
    probe = ep.EntropyProbe(
        model, optimizer, ep.ProbeConfig(direction="optimizer-step", max_grad_norm=cfg.max_grad_norm)
    )
    row = rl_step(0, probe, task, cfg, gen)  # the model and optimizer are the probe's
    assert all(math.isfinite(row[k]) for k in ("forecast", "forecast_se", "truth", "measured"))
    assert row["step_relative_error"] < 1e-3  # theta + eta v is the step AdamW took, on the device too


def test_bf16_truth_on_the_device_equals_the_cpu():
    """The truth of a bf16 model runs in fp32 (theta' and the forward) on the device too, autocast or not."""
    model = tiny_gpt2(seed=0, vocab=VOCAB).to(torch.bfloat16)
    U, E = random_batch(3, vocab=VOCAB, seed=1), random_batch(6, vocab=VOCAB, seed=2)
    cfg = ep.ProbeConfig(lr=1e-2, direction="sgd", truth_alphas=(1 / 64, 1.0))
    v = ep.EntropyProbe(model, config=cfg).update_direction(U)  # one v for both devices
    ref = ep.EntropyProbe(model, config=cfg).run(eval_batch=E, direction=v, truth=True).truth
    dev_model = copy.deepcopy(model).to(DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        out = ep.EntropyProbe(dev_model, config=cfg).run(eval_batch=E, direction=v, truth=True).truth
    for got, want in zip(out.delta_h_at, ref.delta_h_at):
        _close(got, want, REL_TRUTH, "bf16 truth.delta_h_at")
