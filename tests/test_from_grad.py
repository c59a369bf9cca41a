"""``run(eval_batch=E, from_grad=True)`` and ``measure_change`` against real optimizer steps (DESIGN 11).

v is built from the ``.grad`` the caller's own backward left (a loss the probe cannot mirror: the policy
surrogate plus a KL-like term, clipped), so ``theta + lr * v`` must be what the real ``optimizer.step()``
then produces, to 1e-6 of the parameter norm; ``measure_change`` after that step must equal the functional
truth of the same step. Run: ``PYTHONPATH=src pytest -q tests/test_from_grad.py``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from core_support import (
    TinyLM,
    hand_objective,
    hand_token_logprobs,
    numpy_advantages,
    random_batch,
    trainable,
)

import entropy_probe as ep
from entropy_probe.from_grad import direction_from_grad


@dataclass(frozen=True)
class Case:
    opt: str  # "Adam", "AdamW" or "SGD"
    warm_steps: int  # real steps before the probe (0: fresh optimizer state)
    groups: int  # 1 or 2 parameter groups (different lr and weight decay)
    amsgrad: bool = False
    clip: float | None = 1e-2  # the caller's clip_grad_norm_ threshold (active: the norm exceeds it)

    def __str__(self):
        return f"{self.opt}-warm{self.warm_steps}-g{self.groups}{'-ams' if self.amsgrad else ''}"


CASES = [Case(o, w, g) for o in ("Adam", "AdamW") for w in (0, 3) for g in (1, 2)] + [
    Case("AdamW", 2, 2, amsgrad=True),
    Case("SGD", 0, 2, clip=None),
]


def make_optimizer(model: TinyLM, case: Case) -> torch.optim.Optimizer:
    if case.groups == 1:
        groups = [{"params": list(model.parameters()), "lr": 1e-2, "weight_decay": 0.05}]
    else:
        groups = [
            {"params": [model.tok, model.pos, *model.hidden.parameters()], "lr": 1e-2, "weight_decay": 0.1},
            {"params": list(model.head.parameters()), "lr": 3e-3, "weight_decay": 0.0},
        ]
    if case.opt == "SGD":  # direction "sgd" is -grad: the plain SGD step, no decay or momentum; an SGD-sized
        # lr, so that the step stands well above the fp32 rounding of theta (real_v below is read from it)
        return torch.optim.SGD([dict(g, weight_decay=0.0, lr=10 * g["lr"]) for g in groups])
    return getattr(torch.optim, case.opt)(groups, betas=(0.8, 0.95), eps=1e-6, amsgrad=case.amsgrad)


def unmirrorable_backward(model, batch, clip: float | None = 1e-2) -> None:
    """The caller's backward: the GRPO surrogate plus a KL-like penalty no ProbeConfig describes, clipped."""
    lp = hand_token_logprobs(model, batch)  # (N, T)
    j = hand_objective(lp, batch, numpy_advantages(batch, "grpo"), "seq-mean-token-mean")
    kl_like = 0.3 * (lp.square() * batch.response_mask).sum() / batch.response_mask.sum()
    (-j + kl_like).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)


def setup(case: Case, seed: int = 1):
    model = TinyLM(seed=seed)
    opt = make_optimizer(model, case)
    for k in range(case.warm_steps):
        opt.zero_grad()
        unmirrorable_backward(model, random_batch(4, seed=100 + k), case.clip)
        opt.step()
    opt.zero_grad()
    unmirrorable_backward(model, random_batch(5, group_size=[2, 3, 4, 3, 2], seed=7), case.clip)
    model.hidden.bias.grad = None  # a parameter the step skips: v must be 0 there
    return model, opt


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # (P,)


def snapshot(model, opt) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else (p.grad, p.grad.clone()) for n, p in model.named_parameters()
        },
        "opt": copy.deepcopy(opt.state_dict()),
        "rng": torch.get_rng_state(),
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(before: dict, model, opt) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before["params"][n]), n
        g = before["grads"][n]
        assert (p.grad is None) if g is None else (p.grad is g[0] and torch.equal(p.grad, g[1])), (
            f"{n}: .grad"
        )
    after = opt.state_dict()
    assert after["param_groups"] == before["opt"]["param_groups"]
    assert after["state"].keys() == before["opt"]["state"].keys()
    for k, st in before["opt"]["state"].items():
        assert all(torch.equal(torch.as_tensor(st[f]), torch.as_tensor(after["state"][k][f])) for f in st), k
    assert torch.equal(torch.get_rng_state(), before["rng"])
    assert {n: m.training for n, m in model.named_modules()} == before["modes"]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_from_grad_v_is_the_real_step_and_measure_change_is_its_truth(case: Case):
    model, opt = setup(case)
    model.train()
    eval_batch = random_batch(6, group_size=3, seed=11)
    direction = "sgd" if case.opt == "SGD" else "optimizer-step"
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction=direction))
    before = snapshot(model, opt)
    result = probe.run(eval_batch=eval_batch, from_grad=True, truth=True)
    assert_unchanged(before, model, opt)  # .grad included: the probe read it, never wrote it
    assert result.se_total is None and result.n_update_units == 0 and result.lr == opt.param_groups[0]["lr"]
    v = direction_from_grad(direction, trainable(model), opt, result.lr).v
    assert torch.count_nonzero(v["hidden.bias"]) == 0
    theta = flat_params(model).clone()
    predicted = torch.cat([(p.detach() + result.lr * v[n]).reshape(-1) for n, p in model.named_parameters()])

    opt.step()  # the real step, from the caller's .grad
    after = flat_params(model)
    err = float((after - predicted).norm())
    # fp32 on both sides: 1e-6 of |theta| (the requirement); relative to the step the error is the rounding
    # of theta + lr*v, ~2^-24 |theta| / |step| (a wrong bias correction or decay is off by far more
    # than 1e-4).
    assert err / float(theta.norm()) < 1e-6
    assert err / float((after - theta).norm()) < 1e-4

    # the real step projected on the same E (a given direction) is the from_grad forecast
    model_before = TinyLM(seed=1)
    model_before.load_state_dict(before["params"])
    real_v = {n: (p.detach() - before["params"][n]) / result.lr for n, p in model.named_parameters()}
    along = ep.EntropyProbe(model_before, config=ep.ProbeConfig(lr=result.lr)).run(
        eval_batch=eval_batch, direction=real_v
    )
    assert abs(along.delta_h1 - result.delta_h1) <= 1e-4 * abs(result.delta_h1)  # fp32 rounding of real_v

    before_measure = snapshot(model, opt)
    measured = probe.measure_change(result)
    assert_unchanged(before_measure, model, opt)
    # both re-evaluate E at theta + lr*v (functionally / really stepped): equal up to fp32 rounding of theta'
    assert abs(measured.delta_h - result.truth.delta_h) < 1e-6
    assert abs(measured.se - result.truth.se) < 1e-6 and abs(measured.ess - result.truth.ess) < 1e-4
    assert measured.delta_h != 0.0  # the step really moved the entropy


def test_a_failure_inside_the_probe_leaves_the_callers_state_intact(monkeypatch):
    import entropy_probe.passes as passes_module  # the E pass of one process / DDP

    def draw_flip_and_fail(module, *args, **kwargs):
        torch.rand(10)
        module.train()
        raise RuntimeError("injected failure")

    model, opt = setup(Case("AdamW", 2, 2))
    model.eval()
    monkeypatch.setattr(passes_module, "eval_projections", draw_flip_and_fail)
    monkeypatch.setattr(passes_module, "token_projections", draw_flip_and_fail)  # the default's E pass
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="injected failure"):
        ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step")).run(
            eval_batch=random_batch(3, seed=4), from_grad=True
        )
    assert_unchanged(before, model, opt)


def test_adam_preconditioned_from_grad_is_p_times_minus_grad():
    model, opt = setup(Case("Adam", 2, 1))
    params = trainable(model)
    v = direction_from_grad("adam-preconditioned", params, opt, 1e-2).v
    beta2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    for n, p in params.items():
        if p.grad is None:
            assert torch.count_nonzero(v[n]) == 0
            continue
        st = opt.state[p]
        t = int(st["step"]) + 1
        v_hat = (beta2 * st["exp_avg_sq"] + (1 - beta2) * p.grad**2) / (1 - beta2**t)
        torch.testing.assert_close(v[n], -p.grad / (v_hat.sqrt() + eps), rtol=1e-6, atol=0)


def test_config_lr_overrides_eta_and_scales_the_whole_step():
    model, opt = setup(Case("AdamW", 2, 2))
    eval_batch = random_batch(5, seed=12)
    base = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step")).run(
        eval_batch=eval_batch, from_grad=True
    )
    double = ep.EntropyProbe(model, opt, ep.ProbeConfig(lr=2e-2, direction="optimizer-step"))
    result = double.run(eval_batch=eval_batch, from_grad=True, truth=True)
    assert result.lr == 2e-2 and base.lr == 1e-2
    assert abs(result.delta_h1 - 2 * base.delta_h1) <= 1e-12 + 1e-6 * abs(result.delta_h1)
    # ... and that forecast is of the real step with every group's lr doubled (AdamW is linear in lr)
    for g in opt.param_groups:
        g["lr"] *= 2
    opt.step()
    measured = double.measure_change(result)
    assert abs(measured.delta_h - result.truth.delta_h) < 1e-6


def test_lr_zero_forecasts_exactly_zero():
    model, opt = setup(Case("AdamW", 1, 2))
    for g in opt.param_groups:
        g["lr"] = 0.0  # warm-up
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step"))
    result = probe.run(eval_batch=random_batch(4, seed=3), from_grad=True, truth=True)
    assert (result.lr, result.delta_h1, result.se_cond_e, result.se_jackknife) == (0.0, 0.0, 0.0, 0.0)
    assert result.truth.delta_h == 0.0
    opt.step()
    assert probe.measure_change(result).delta_h == 0.0


def test_accelerated_optimizer_is_unwrapped():
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    model, opt = setup(Case("AdamW", 1, 2))
    eval_batch = random_batch(4, seed=3)
    cfg = ep.ProbeConfig(direction="optimizer-step")
    plain = ep.EntropyProbe(model, opt, cfg).run(eval_batch=eval_batch, from_grad=True)
    accelerated = Accelerator(cpu=True).prepare_optimizer(opt)
    assert isinstance(accelerated, AcceleratedOptimizer)
    wrapped = ep.EntropyProbe(model, accelerated, cfg)
    assert wrapped.optimizer is opt
    assert wrapped.run(eval_batch=eval_batch, from_grad=True).delta_h1 == plain.delta_h1


def test_from_grad_errors_name_the_problem_and_leave_state_intact():
    model, opt = setup(Case("AdamW", 1, 1))
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step"))
    eval_batch = random_batch(4, seed=3)
    with pytest.raises(ValueError, match="give exactly one of update_batch, direction and from_grad"):
        probe.run(update_batch=eval_batch, eval_batch=eval_batch, from_grad=True)
    model.head.weight.grad[0, 0] = float("inf")  # (NaN != NaN would defeat the bit-identity check)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"from_grad: the \.grad of parameter 'head\.weight' is not finite"):
        probe.run(eval_batch=eval_batch, from_grad=True)
    assert_unchanged(before, model, opt)
    opt.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="from_grad: no trainable parameter has a .grad"):
        probe.run(eval_batch=eval_batch, from_grad=True)
    with pytest.raises(ValueError, match="measure_change: result must be a ProbeResult"):
        probe.measure_change(object())


def _with_empty_rows(batch: ep.RolloutBatch, rows: list[int]) -> ep.RolloutBatch:
    resp = batch.response_mask.clone()
    resp[rows] = 0  # a truncation the trainer masked
    return ep.RolloutBatch(
        batch.input_ids, batch.attention_mask, resp, batch.group_ids, rewards=batch.rewards
    )


def test_eval_rows_without_response_are_dropped_and_counted():
    model, opt = setup(Case("AdamW", 1, 1))
    full = random_batch(4, group_size=4, seed=21)
    masked = _with_empty_rows(full, [1, 6, 7])  # unit 0 keeps 3 rows, unit 1 keeps 2
    keep = [i for i in range(full.n_sequences) if i not in (1, 6, 7)]
    kept = ep.RolloutBatch(
        full.input_ids[keep], full.attention_mask[keep], full.response_mask[keep], full.group_ids[keep]
    )
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-step"))
    a, b = probe.run(eval_batch=masked, from_grad=True), probe.run(eval_batch=kept, from_grad=True)
    assert (a.n_dropped_rows, b.n_dropped_rows, a.n_eval_units) == (3, 0, 4)
    assert a.to_dict()["entropy_probe/n_dropped_rows"] == 3
    assert a.delta_h1 == b.delta_h1 and a.se_cond_e == b.se_cond_e and torch.equal(a.per_unit, b.per_unit)
    gid = int(full.group_ids[4])
    with pytest.raises(
        ValueError, match=rf"unit {gid} has 1 response\(s\) \(3 row\(s\) with an empty response"
    ):
        _with_empty_rows(full, [4, 5, 6])
    with pytest.raises(ValueError, match=r"update_batch: 3 row\(s\) have no response token"):
        probe.run(update_batch=masked, eval_batch=kept)


def test_the_core_imports_without_trl():
    """``trl`` is an optional extra: ``import entropy_probe`` loads neither it nor the integrations."""
    code = "import sys, entropy_probe; assert not {'trl', 'entropy_probe.integrations'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
