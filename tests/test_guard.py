"""The entropy guard (DESIGN section 15), checked on its mathematics:

- the scale solves the budget equation (the lower bound at ``c`` equals ``-max_drop``) and is the
  largest such ``c``: first order on real probe results, second order on per-unit values whose SE is
  recomputed by its definition (the sample SE of the per-unit values at ``c``);
- ``applied`` makes a real Adam/AdamW/SGD step exactly ``c`` times the unguarded one (same warm
  state, double precision) and gives back the lrs bit-exact, also when the step raises;
- on the enumerable policy, the guarded step's EXACT entropy change (enumeration) stays within the
  budget in at least ``level`` of many independent E draws.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import re
from pathlib import Path
from statistics import NormalDist

import pytest
import torch
from torch import nn

import entropy_probe as ep
from entropy_probe.guard import NO_STEP, RAISES, SCALED, WITHIN, GuardDecision
from entropy_probe.toy import EOS, TabularPolicy, exact_entropy, sample_enumerated


def stop_at_once(prompt, response) -> float:
    """Reward the one-token response EOS: learning it removes entropy (the guard has work to do)."""
    return float(response == (EOS,))


def toy_setup(lr: float = 3e-3, n_update: int = 32):
    policy = TabularPolicy(seed=0, scale=0.5)
    U = sample_enumerated(policy, n_units=n_update, seed=1, reward_fn=stop_at_once)
    probe = ep.EntropyProbe(
        policy,
        config=ep.ProbeConfig(
            entropy="sequence", lr=lr, direction="adam-preconditioned", unconditional_se=False
        ),
    )
    return policy, probe, probe.update_direction(U)


def lower_bound(result, c: float, level: float) -> float:
    """First-order forecast at ``c * eta`` at its one-sided lower bound, from the result's fields."""
    return c * result.delta_h1 - NormalDist().inv_cdf(level) * c * result.se_cond_e


# ---- arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_drop": 0.0}, "max_drop"),
        ({"max_drop": -1e-3}, "max_drop"),
        ({"max_drop": math.nan}, "max_drop"),
        ({"max_drop": math.inf}, "max_drop"),
        ({"max_drop": 1e-3, "level": 0.0}, "level"),
        ({"max_drop": 1e-3, "level": 1.0}, "level"),
        ({"max_drop": 1e-3, "level": 1.5}, "level"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ep.EntropyGuard(**kwargs)


def test_bad_results_and_decisions_name_the_field():
    policy, probe, v = toy_setup()
    r = probe.run(eval_batch=sample_enumerated(policy, n_units=8, seed=5), direction=v)
    guard = ep.EntropyGuard(1e-3)
    for name, value in (("delta_h1", math.nan), ("se_cond_e", math.inf), ("lr", None), ("se_cond_e", -1.0)):
        with pytest.raises(ValueError, match=name):
            guard.decide(dataclasses.replace(r, **{name: value}))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    for scale in (0.0, 1.5, math.nan):
        decision = GuardDecision(scale, SCALED, 0.0, 0.0, 0.0, 1)
        with pytest.raises(ValueError, match="scale"), guard.applied(optimizer, decision):
            pass
    assert optimizer.param_groups[0]["lr"] == 1e-3
    with pytest.raises(TypeError, match="optimizer"), guard.applied(object(), guard.decide(r)):
        pass


# ---- first order: the budget equation on real probe results --------------------------------------
def test_first_order_scale_solves_the_budget_equation_and_is_the_probe_at_the_scaled_lr():
    policy, probe, v = toy_setup()
    E = sample_enumerated(policy, n_units=16, seed=7)
    r = probe.run(eval_batch=E, direction=v)
    level, max_drop = 0.9, abs(r.delta_h1) / 4
    d = ep.EntropyGuard(max_drop, level).decide(r)
    assert d.reason == SCALED and 0 < d.scale < 1 and d.order == 1
    assert abs(lower_bound(r, d.scale, level) + max_drop) <= 1e-9  # binding: bound at c == -max_drop
    assert lower_bound(r, d.scale * (1 + 1e-6), level) < -max_drop  # and c is the largest such scale
    assert math.isclose(d.bound, -max_drop, rel_tol=1e-9) and math.isclose(d.forecast, d.scale * r.delta_h1)
    assert d.to_dict() == {
        "entropy_probe/guard_scale": d.scale,
        "entropy_probe/guard_forecast": d.forecast,
        "entropy_probe/guard_bound": d.bound,
        "entropy_probe/guard_se": d.se,
    }
    # second method: the probe itself at lr c * eta forecasts c times the change with c times the SE,
    # and the guard finds that step exactly on budget
    scaled = ep.EntropyProbe(policy, config=dataclasses.replace(probe.config, lr=d.scale * r.lr))
    r_c = scaled.run(eval_batch=E, direction=v)
    assert math.isclose(r_c.delta_h1, d.forecast, rel_tol=1e-9)
    assert math.isclose(r_c.se_cond_e, d.se, rel_tol=1e-9)
    d_c = ep.EntropyGuard(max_drop, level).decide(r_c)
    assert d_c.scale == 1.0 and d_c.reason == WITHIN and math.isclose(d_c.bound, -max_drop, rel_tol=1e-9)


def test_scale_one_when_within_budget_raising_entropy_or_no_step():
    policy, probe, v = toy_setup()
    r = probe.run(eval_batch=sample_enumerated(policy, n_units=16, seed=7), direction=v)
    assert r.delta_h1 < 0
    roomy = ep.EntropyGuard(max_drop=-2 * lower_bound(r, 1.0, 0.95))
    assert (roomy.decide(r).scale, roomy.decide(r).reason) == (1.0, WITHIN)
    tight = ep.EntropyGuard(max_drop=1e-9)
    up = dataclasses.replace(r, delta_h1=-r.delta_h1, se_cond_e=abs(r.delta_h1) / 10)
    assert (tight.decide(up).scale, tight.decide(up).reason) == (1.0, RAISES)
    for flat in (
        dataclasses.replace(r, lr=0.0, delta_h1=0.0, se_cond_e=0.0),
        dataclasses.replace(r, delta_h1=0.0, se_cond_e=0.0),
    ):
        d = tight.decide(flat)
        assert (d.scale, d.reason, d.forecast, d.bound) == (1.0, NO_STEP, 0.0, 0.0)


# ---- second order: the algebra on per-unit values ------------------------------------------------
@dataclasses.dataclass
class SecondOrderResult:
    """Stand-in for a ProbeResult with the second-order fields (DESIGN section 12)."""

    per_unit: torch.Tensor  # s_n
    per_unit_q: torch.Tensor | None  # q_n
    lr: float
    se_delta_h2: float | None = None

    @property
    def delta_h1(self) -> float:
        return self.lr * float(self.per_unit.mean())

    @property
    def delta_h2(self) -> float:
        return self.lr**2 / 2 * float(self.per_unit_q.mean())

    @property
    def se_cond_e(self) -> float:
        return self.lr * float(self.per_unit.std()) / math.sqrt(len(self.per_unit))


def second_order_bound(r: SecondOrderResult, c: float, level: float) -> float:
    """Definition: the per-unit values at ``c``, their mean minus z times their sample SE."""
    x = c * r.lr * r.per_unit + c * c * r.lr**2 / 2 * r.per_unit_q  # (B_E,)
    return float(x.mean()) - NormalDist().inv_cdf(level) * float(x.std()) / math.sqrt(len(x))


@pytest.mark.parametrize(
    "seed, s_mean, q_mean, rho",
    [(0, -1.0, -3.0, 0.5), (1, -1.0, 2.0, -0.3), (2, -2.0, 1.5, 0.9), (3, -0.5, -1.0, 0.0)],
)
def test_second_order_scale_solves_the_budget_equation(seed, s_mean, q_mean, rho):
    gen = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(2, 24, generator=gen, dtype=torch.float64)
    s = s_mean + z1
    q = q_mean + 3 * (rho * z1 + math.sqrt(1 - rho**2) * z2)
    r = SecondOrderResult(s, q, lr=0.4)
    level, max_drop = 0.95, 0.05
    assert second_order_bound(r, 1.0, level) < -max_drop  # the full step is over budget
    d = ep.EntropyGuard(max_drop, level).decide(r)
    assert d.reason == SCALED and d.order == 2
    assert all(type(x) is float for x in (d.scale, d.forecast, d.bound, d.se))  # JSON-ready, no numpy scalars
    assert abs(second_order_bound(r, d.scale, level) + max_drop) <= 1e-9
    assert math.isclose(d.forecast, d.scale * r.delta_h1 + d.scale**2 * r.delta_h2, rel_tol=1e-12)
    above = torch.linspace(d.scale + 1e-7, 1.0, 4001, dtype=torch.float64)
    assert all(second_order_bound(r, float(c), level) < -max_drop for c in above)  # the largest root


def test_second_order_scale_matches_a_brute_force_search_over_random_results():
    """Second method: the largest c on a 20001-point grid whose bound, from the per-unit values at c
    by definition, is within budget; the solver's scale must sit in the grid cell above it."""
    gen = torch.Generator().manual_seed(11)
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)[1:]  # (C,)
    z, reasons = NormalDist().inv_cdf(0.9), set()
    for _ in range(100):
        mean_s, mean_q, noise = torch.randn(3, generator=gen, dtype=torch.float64) * torch.tensor([1, 3, 1])
        s = mean_s + noise.abs() * torch.randn(16, generator=gen, dtype=torch.float64)
        q = mean_q + 3 * noise.abs() * torch.randn(16, generator=gen, dtype=torch.float64)
        r = SecondOrderResult(s, q, lr=0.5)
        max_drop = 10 ** float(torch.empty(1, dtype=torch.float64).uniform_(-2, 0.5, generator=gen))
        d = ep.EntropyGuard(max_drop, level=0.9).decide(r)
        x = grid[:, None] * r.lr * s + grid[:, None] ** 2 * r.lr**2 / 2 * q  # (C, B_E) per-unit values at c
        bound = x.mean(dim=1) - z * x.std(dim=1) / math.sqrt(16)  # (C,)
        brute = 1.0 if bool(bound[-1] >= -max_drop) else float(grid[bound >= -max_drop].max())
        assert brute - 1e-12 <= d.scale <= brute + 1 / 20000, (brute, d)
        reasons.add(d.reason)
    assert {SCALED, WITHIN, RAISES} <= reasons  # the draws cover the cases


def test_second_order_takes_the_step_not_the_path():
    """Curvature that first deepens then undoes the drop: the full step is within budget, scale 1."""
    s, q = torch.full((8,), -1.0, dtype=torch.float64), torch.full((8,), 1.8, dtype=torch.float64)
    r = SecondOrderResult(s, q, lr=1.0)  # forecast c (-1) + c^2 0.9: -0.278 at c = 0.56, -0.1 at c = 1; SE 0
    d = ep.EntropyGuard(max_drop=0.2).decide(r)
    assert (d.scale, d.reason) == (1.0, WITHIN) and math.isclose(d.forecast, -0.1)


def test_second_order_without_per_unit_q_bounds_the_se_by_the_sum():
    gen = torch.Generator().manual_seed(4)
    s, q = (
        -1 + torch.randn(24, generator=gen, dtype=torch.float64),
        -2 + torch.randn(24, generator=gen, dtype=torch.float64),
    )
    full = SecondOrderResult(s, q, lr=0.4)
    se2 = 0.4**2 / 2 * float(q.std()) / math.sqrt(24)

    @dataclasses.dataclass
    class NoQ:
        delta_h1: float
        se_cond_e: float
        lr: float
        delta_h2: float
        se_delta_h2: float | None

    z, max_drop = NormalDist().inv_cdf(0.95), 0.05
    d = ep.EntropyGuard(max_drop).decide(NoQ(full.delta_h1, full.se_cond_e, 0.4, full.delta_h2, se2))
    c = d.scale
    bound = c * full.delta_h1 + c * c * full.delta_h2 - z * (c * full.se_cond_e + c * c * se2)
    assert d.reason == SCALED and abs(bound + max_drop) <= 1e-9
    assert second_order_bound(full, c, 0.95) >= -max_drop  # SE(sum) <= sum of SEs: conservative
    with pytest.raises(ValueError, match="per_unit_q"):  # q_n that do not average to delta_h2
        ep.EntropyGuard(max_drop).decide(_Fixed(full, 2 * full.delta_h2))


class _Fixed:
    """A result whose delta_h2 disagrees with its per-unit q_n."""

    def __init__(self, r: SecondOrderResult, delta_h2: float):
        self.per_unit, self.per_unit_q, self.lr = r.per_unit, r.per_unit_q, r.lr
        self.delta_h1, self.se_cond_e, self.delta_h2 = r.delta_h1, r.se_cond_e, delta_h2


# ---- applied: a real optimizer step ------------------------------------------------------------
def warm_model_and_optimizer(make_optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    optimizer = make_optimizer(
        [{"params": model[0].parameters(), "lr": 3e-2}, {"params": model[2].parameters(), "lr": 1e-2}]
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9**step)  # sets the lrs
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)

    def grads():
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()

    for _ in range(3):  # warm state: moments, step counts
        grads(), optimizer.step(), scheduler.step()
    grads()
    return model, optimizer


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups, weight_decay=0.1),
    "adam-l2": lambda groups: torch.optim.Adam(groups, weight_decay=0.1),  # L2 enters the gradient
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, momentum=0.9, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_applied_step_is_exactly_c_times_the_unguarded_step(name):
    model, optimizer = warm_model_and_optimizer(OPTIMIZERS[name])
    guarded_model, guarded_optimizer = copy.deepcopy((model, optimizer))  # same params and state
    for p, q in zip(model.parameters(), guarded_model.parameters()):
        q.grad = p.grad.clone()  # deepcopy leaves a Parameter's grad behind
    before = [p.detach().clone() for p in model.parameters()]
    lrs = [g["lr"] for g in guarded_optimizer.param_groups]
    c = 0.3717
    optimizer.step()
    with ep.EntropyGuard(1e-3).applied(guarded_optimizer, GuardDecision(c, SCALED, 0.0, 0.0, 0.0, 1)):
        guarded_optimizer.step()
    for p0, p, q in zip(before, model.parameters(), guarded_model.parameters()):
        full, guarded = p.detach() - p0, q.detach() - p0
        assert float((guarded - c * full).abs().max()) <= 1e-6 * float((c * full).abs().max())
    assert [g["lr"] for g in guarded_optimizer.param_groups] == lrs  # bit-exact
    assert all(a is b for a, b in zip((g["lr"] for g in guarded_optimizer.param_groups), lrs))
    for p, q in zip(model.parameters(), guarded_model.parameters()):  # the moments do not see the lr
        for key, value in optimizer.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(guarded_optimizer.state[q][key]))


class Failing(torch.optim.AdamW):
    """An AdamW whose step fails after reading its lrs."""

    def step(self, closure=None):
        self.seen = [g["lr"] for g in self.param_groups]
        raise RuntimeError("step failed")


def test_applied_gives_the_lrs_back_when_the_step_or_the_block_raises():
    model = nn.Linear(3, 2)
    optimizer = Failing([{"params": [model.weight], "lr": 1e-3}, {"params": [model.bias], "lr": 7e-4}])
    guard = ep.EntropyGuard(1e-3)
    decision = GuardDecision(0.25, SCALED, 0.0, 0.0, 0.0, 1)
    with pytest.raises(RuntimeError, match="step failed"), guard.applied(optimizer, decision):
        optimizer.step()
    assert optimizer.seen == [0.25 * 1e-3, 0.25 * 7e-4]
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 7e-4]
    with pytest.raises(KeyError), guard.applied(optimizer, GuardDecision(0.5, SCALED, 0.0, 0.0, 0.0, 1)):
        raise KeyError("no step at all")
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 7e-4]


def test_applied_scales_one_step_and_leaves_a_scheduler_step_inside_the_block_alone():
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)  # reads the current lr
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    model(torch.ones(1, 3)).sum().backward()
    with ep.EntropyGuard(1e-3).applied(optimizer, GuardDecision(0.2, SCALED, 0.0, 0.0, 0.0, 1)):
        optimizer.step()
        scheduler.step()  # what a trainer does right after the step
        optimizer.step()  # a second step is not guarded
    assert seen == [0.1 * 0.2, 0.05] and optimizer.param_groups[0]["lr"] == 0.05


def test_applied_unwraps_an_accelerate_optimizer():
    accelerate = pytest.importorskip("accelerate")
    model = nn.Linear(3, 2)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapped = accelerate.Accelerator(cpu=True).prepare_optimizer(inner)
    assert type(wrapped).__name__ == "AcceleratedOptimizer" and wrapped.optimizer is inner
    seen = []
    inner.register_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    model(torch.ones(1, 3)).sum().backward()
    with ep.EntropyGuard(1e-3).applied(wrapped, GuardDecision(0.5, SCALED, 0.0, 0.0, 0.0, 1)):
        wrapped.step()
    assert seen == [0.5e-3] and inner.param_groups[0]["lr"] == 1e-3


def test_guarded_real_step_is_the_forecast_step_at_the_scale():
    """End to end on the toy: probe an AdamW step, decide, take the real step under the guard; the
    parameters move by ``c * eta * v`` with v the probe's "optimizer-step" direction."""
    policy = TabularPolicy(seed=0, scale=0.5).double()  # double: the step is not lost in theta's rounding
    U = sample_enumerated(policy, n_units=16, seed=1, reward_fn=stop_at_once)
    E = sample_enumerated(policy, n_units=16, seed=2)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.05, weight_decay=0.01)
    config = ep.ProbeConfig(direction="optimizer-step", loss_aggregation="seq-mean-token-mean")
    probe = ep.EntropyProbe(policy, optimizer, config)
    v = probe.update_direction(U)
    r = probe.run(eval_batch=E, direction=v)
    d = ep.EntropyGuard(max_drop=abs(r.delta_h1) / 5).decide(r)
    assert d.reason == SCALED
    before = policy.table.detach().clone()
    ep.policy_loss(policy, U, config).backward()
    with ep.EntropyGuard(max_drop=abs(r.delta_h1) / 5).applied(optimizer, d):
        optimizer.step()
    step, expected = policy.table.detach() - before, d.scale * r.lr * v["table"].double()
    assert float((step - expected).abs().max()) <= 1e-6 * float(expected.abs().max())  # v is kept in fp32
    assert optimizer.param_groups[0]["lr"] == 0.05


# ---- the guarantee, on exact entropies -----------------------------------------------------------
def test_guarded_exact_entropy_change_stays_within_budget_at_the_level():
    """U (so v) fixed, K independent E draws: each draw's guarded step ``theta + c_k eta v`` has its
    exact entropy change (enumeration) >= -max_drop in at least ``level`` of the draws.

    Why: when the guard binds, a violation means the true first-order change c D is below the bound
    c (d1 - z se) = -max_drop, i.e. D < d1 - z se, which a valid one-sided bound allows with
    probability 1 - level; when it does not bind, a violation also needs D < -max_drop <= d1 - z se.
    eta is small enough that the curvature moves the change by < 1% (checked below; 0.3%), far inside the
    slack, so the first-order guard is tested on the exact entropy.
    """
    torch.set_num_threads(1)
    policy, probe, v = toy_setup(lr=3e-3)
    eta, level, K = probe.config.lr, 0.95, 300
    h0 = float(exact_entropy(policy).detach())

    def exact_change(c: float) -> float:
        moved = copy.deepcopy(policy)
        with torch.no_grad():
            moved.table += c * eta * v["table"]
        return float(exact_entropy(moved).detach()) - h0

    full = exact_change(1.0)
    max_drop = abs(full) / 3  # the unguarded step removes 3x the budget
    guard = ep.EntropyGuard(max_drop, level)
    assert abs(exact_change(1 / 3) - full / 3) <= 0.01 * abs(full / 3)  # first order holds at these scales
    inside, scales = 0, []
    for k in range(K):
        r = probe.run(eval_batch=sample_enumerated(policy, n_units=32, seed=1000 + k), direction=v)
        d = guard.decide(r)
        scales.append(d.scale)
        inside += exact_change(d.scale) >= -max_drop
    rate, se = inside / K, math.sqrt(level * (1 - level) / K)  # binomial SE of the rate: 0.0126
    assert rate >= level - 3 * se, (rate, level, se)  # at least the level, 3 SE slack: >= 0.912
    # Not vacuous: the guard bound in every draw, so a draw overshoots exactly when the one-sided bound
    # misses D, and the rate estimates the bound's coverage: it must not be far ABOVE the level either
    # (a guard with, say, z = 3 would give ~1.0 and waste the budget). Measured: 0.94 (600 draws: 0.942).
    assert max(scales) < 1
    assert rate <= level + 3 * se, (rate, level, se)


def test_readme_guard_example_runs_after_the_readme_example():
    """The README's guard block, run in the scope of its first example, takes one guarded step."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    guard_block = next(b for b in blocks if "EntropyGuard" in b)
    scope: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102 (the README as written)
    model, optimizer = scope["model"], scope["optimizer"]
    lr, before = optimizer.param_groups[0]["lr"], [p.detach().clone() for p in model.parameters()]
    exec(compile(guard_block, "README.md", "exec"), scope)  # noqa: S102
    decision = scope["decision"]
    assert decision.reason in (SCALED, WITHIN, RAISES, NO_STEP) and 0 < decision.scale <= 1
    assert decision.bound >= -1e-3 - 1e-12  # the step taken is within the README's budget at its bound
    assert optimizer.param_groups[0]["lr"] == lr and any(
        not torch.equal(b, p) for b, p in zip(before, model.parameters())
    )


# ---- issue 23: the decision's lr against the optimizer's; the budget's rounding tolerance ------------
def test_applied_refuses_a_decision_made_for_another_lr():
    """A forecast made with ProbeConfig(lr=1e-5) must not scale the optimizer's 100x larger step."""
    policy = TabularPolicy(seed=0, scale=0.5)
    U = sample_enumerated(policy, n_units=16, seed=1, reward_fn=stop_at_once)
    E = sample_enumerated(policy, n_units=8, seed=5)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    cfg = ep.ProbeConfig(lr=1e-5, direction="optimizer-step", unconditional_se=False)
    result = ep.EntropyProbe(policy, optimizer, cfg).run(U, E)
    decision = ep.EntropyGuard(1e-3).decide(result)
    assert decision.lr == 1e-5
    before = [g["lr"] for g in optimizer.param_groups]
    with pytest.raises(ValueError, match=r"lr 1e-05 \(result\.lr\) but the optimizer's lr is 0\.001"):
        with ep.EntropyGuard(1e-3).applied(optimizer, decision):
            pass
    assert [g["lr"] for g in optimizer.param_groups] == before
    own = ep.EntropyProbe(policy, optimizer, dataclasses.replace(cfg, lr=None)).run(U, E)
    with ep.EntropyGuard(1e-3).applied(optimizer, ep.EntropyGuard(1e-3).decide(own)):
        pass  # the optimizer's own lr: accepted


@pytest.mark.parametrize("over", [1e-6, 1e-9])
def test_a_bound_just_over_the_budget_is_scaled(over):
    """Only float rounding (1e-12 relative) counts as on the budget: a bound ``over`` (relative) beyond it
    is a step over budget and must be scaled, to a bound that sits on the budget."""
    policy, probe, v = toy_setup()
    r = probe.run(eval_batch=sample_enumerated(policy, n_units=8, seed=5), direction=v)
    guard = ep.EntropyGuard(1e-3)
    z = guard.z
    # a result whose full-step bound is exactly -(1 + over) * max_drop
    se = 1e-4
    d1 = -(1 + over) * guard.max_drop + z * se
    res = dataclasses.replace(r, delta_h1=d1, se_cond_e=se, delta_h2=None)
    decision = guard.decide(res)
    assert decision.reason == SCALED and decision.scale < 1
    assert decision.bound == pytest.approx(-guard.max_drop, rel=1e-9)
    on_budget = dataclasses.replace(res, delta_h1=-guard.max_drop + z * se)
    assert guard.decide(on_budget).reason == WITHIN
