"""The update direction v against a real ``optimizer.step()`` (DESIGN section 4).

``theta + eta * v`` with ``direction="optimizer-step"`` must be the parameters a real Adam/AdamW step
produces on the loss ``-J_U``, to 1e-6 relative to the parameter norm. The real step's loss is written
by hand per aggregation (tests/core_support.hand_objective) from hand log-probs and numpy advantages,
so the test also checks the probe's coefficients.
Run: ``PYTHONPATH=src pytest -q tests/test_core_direction.py``.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class StepCase:
    opt: str  # "Adam" or "AdamW"
    warm_steps: int  # real steps taken before the probe (0: fresh state)
    groups: int  # 1 or 2 parameter groups
    clip: float | None = None  # clip_grad_norm_ threshold (ProbeConfig.max_grad_norm)
    amsgrad: bool = False
    aggregation: str = "seq-mean-token-mean"
    estimator: str = "grpo"
    frozen: bool = False  # one parameter with requires_grad=False inside the optimizer
    foreach: bool | None = None  # torch's multi-tensor implementation (None: torch's default for CPU)

    def __str__(self):
        return (
            f"{self.opt}-warm{self.warm_steps}-g{self.groups}-clip{self.clip}-ams{int(self.amsgrad)}-"
            f"{self.aggregation}-{self.estimator}{'-frozen' if self.frozen else ''}"
            f"{'-foreach' if self.foreach else ''}"
        )


# Clipping at 1e-3 is active on every case here (asserted below: the real total norm exceeds it).
CLIP = 1e-3
# Clipping at 1e3 is never active (asserted: the norm is below it): clip_grad_norm_'s factor is capped at 1,
# and with warm state (Adam is not scale invariant then) an uncapped factor max_norm / norm would move
# the step.
LOOSE_CLIP = 1e3
NORM_LENGTH = 12  # Dr. GRPO's constant length (TRL: max_completion_length), longer than any response here
CASES = (
    [StepCase(o, w, g, c) for o in ("Adam", "AdamW") for w in (0, 3) for g in (1, 2) for c in (None, CLIP)]
    + [StepCase(o, 3, 2, CLIP, amsgrad=True) for o in ("Adam", "AdamW")]
    + [StepCase("AdamW", 0, 1, amsgrad=True)]
    + [
        StepCase("AdamW", 2, 2, None, aggregation=a)
        for a in ("seq-mean-token-sum", "token-mean", "seq-mean-token-sum-norm")
    ]
    + [StepCase("Adam", 2, 2, CLIP, estimator=e) for e in ("rloo", "dr-grpo", "given")]
    + [StepCase("AdamW", 2, 2, None, frozen=True)]
    + [StepCase(o, 2, 2, LOOSE_CLIP) for o in ("Adam", "AdamW")]
    + [StepCase(o, 2, 2, CLIP, amsgrad=True, foreach=True) for o in ("Adam", "AdamW")]
)


def make_optimizer(model: TinyLM, case: StepCase) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, case.opt)
    if case.groups == 1:
        groups = [dict(params=list(model.parameters()), lr=1e-2, weight_decay=0.05)]
    else:  # different lr and weight decay per group
        groups = [
            dict(params=[model.tok, model.pos, *model.hidden.parameters()], lr=1e-2, weight_decay=0.1),
            dict(params=list(model.head.parameters()), lr=3e-3, weight_decay=0.0),
        ]
    return cls(groups, betas=(0.8, 0.95), eps=1e-6, amsgrad=case.amsgrad, foreach=case.foreach)


def real_step(model, optimizer, batch, case: StepCase) -> float | None:
    """One training step on ``-J_U`` written by hand; returns the pre-clip gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    estimator = case.estimator
    loss = -hand_objective(
        hand_token_logprobs(model, batch),
        batch,
        numpy_advantages(batch, estimator),
        case.aggregation,
        NORM_LENGTH,
    )
    loss.backward()
    norm = None
    if case.clip is not None:
        norm = float(
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], case.clip)
        )
    optimizer.step()
    return norm


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # (P,)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_optimizer_step_direction_equals_real_step(case: StepCase):
    model = TinyLM(seed=1)
    if case.frozen:
        model.hidden.bias.requires_grad_(False)
    optimizer = make_optimizer(model, case)
    given = case.estimator == "given"
    for k in range(case.warm_steps):  # existing state: real steps on other batches
        real_step(model, optimizer, random_batch(4, seed=100 + k, advantages=given), case)
    update = random_batch(5, group_size=[2, 3, 4, 3, 2], seed=7, advantages=given)

    probe = ep.EntropyProbe(
        model,
        optimizer,
        ep.ProbeConfig(
            direction="optimizer-step",
            loss_aggregation=case.aggregation,
            advantage_estimator=case.estimator,
            max_grad_norm=case.clip,
            microbatch_units=2,
            norm_length=NORM_LENGTH,
        ),
    )
    v = probe.update_direction(update)
    eta = probe.lr
    assert eta == optimizer.param_groups[0]["lr"]
    params = trainable(model)
    assert set(v) == set(params)  # the frozen parameter is not part of v
    theta = flat_params(model).clone()
    # a parameter outside v (frozen) must stay where it is: predicted = theta there
    predicted = torch.cat(
        [
            (p.detach() + eta * v[n]).reshape(-1) if n in v else p.detach().reshape(-1)
            for n, p in model.named_parameters()
        ]
    )  # (P,)

    norm = real_step(model, optimizer, update, case)
    if case.clip == CLIP:
        assert norm > case.clip  # clipping really acts in this case
    elif case.clip == LOOSE_CLIP:
        assert norm < case.clip  # clipping is inactive: the factor is 1, not max_norm / norm
    after = flat_params(model)
    err = float((after - predicted).norm())
    rel_param = err / float(theta.norm())
    rel_step = err / float((after - theta).norm())
    print(f"{case}: |error|/|theta| = {rel_param:.2e}, |error|/|step| = {rel_step:.2e}")
    # The requirement: 1e-6 relative to the parameter norm (fp32 arithmetic on both sides).
    assert rel_param < 1e-6
    # Relative to the step itself the error is fp32 rounding of theta + eta*v: about
    # 2^-24 |theta| / |step| ~ 6e-8 * 30 here; 1e-4 leaves room yet fails on any arithmetic mistake
    # (a wrong bias correction or decay moves the step by far more than 1e-4 of itself).
    assert rel_step < 1e-4


def _grad_j(model, batch, aggregation="seq-mean-token-mean", estimator="grpo"):
    params = trainable(model)
    j = hand_objective(
        hand_token_logprobs(model, batch), batch, numpy_advantages(batch, estimator), aggregation
    )
    return dict(zip(params, torch.autograd.grad(j, list(params.values()))))


@pytest.mark.parametrize("groups", [1, 2])
def test_sgd_direction_is_the_gradient_with_group_lr_ratio(groups):
    """direction="sgd": v = (lr_group / eta) grad J_U, so theta + eta v is the SGD step of every group."""
    model = TinyLM(seed=2)
    optimizer = make_optimizer(model, StepCase("Adam", 0, groups))
    batch = random_batch(4, seed=3)
    v = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction="sgd")).update_direction(batch)
    g = _grad_j(model, batch)
    eta = optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            torch.testing.assert_close(v[name], group["lr"] / eta * g[name], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("warm_steps", [0, 2])
def test_adam_preconditioned_direction_by_hand(warm_steps):
    """v = (lr_group/eta) grad J_U / (sqrt(v_hat) + eps) with the v_hat Adam's next step uses:
    (beta2 exp_avg_sq + (1 - beta2) g^2) / (1 - beta2^(t+1)), which is g^2 when fresh."""
    model = TinyLM(seed=4)
    case = StepCase("AdamW", warm_steps, 2)
    optimizer = make_optimizer(model, case)
    for k in range(warm_steps):
        real_step(model, optimizer, random_batch(4, seed=50 + k), case)
    batch = random_batch(4, seed=5)
    v = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction="adam-preconditioned")).update_direction(
        batch
    )
    g = _grad_j(model, batch)
    eta = optimizer.param_groups[0]["lr"]
    beta2, eps = optimizer.param_groups[0]["betas"][1], optimizer.param_groups[0]["eps"]
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            if warm_steps:
                state = optimizer.state[p]
                t = int(state["step"]) + 1
                v_hat = (beta2 * state["exp_avg_sq"] + (1 - beta2) * g[name] ** 2) / (1 - beta2**t)
            else:
                v_hat = g[name] ** 2  # Adam's first step: (1 - beta2) g^2 / (1 - beta2)
            expected = group["lr"] / eta * g[name] / (v_hat.sqrt() + eps)
            # g comes from two fp32 routes (probe vs hand); where g nearly cancels its rounding (~1e-7 of
            # the summands) is a large share of g: v = O(1) when fresh, so 1e-6 absolute is still fp32-tight.
            torch.testing.assert_close(v[name], expected, rtol=1e-5, atol=1e-6)


def test_adamw_without_the_decoupled_flag_is_still_decoupled():
    """Before torch 2.7 AdamW was not an Adam subclass and its groups had no ``decoupled_weight_decay``
    key (the package supports torch >= 2.4): the probe must still apply decoupled decay for AdamW."""
    model = TinyLM(seed=6)
    case = StepCase("AdamW", 2, 2)
    optimizer = make_optimizer(model, case)
    for k in range(2):
        real_step(model, optimizer, random_batch(4, seed=60 + k), case)
    batch = random_batch(4, seed=61)
    probe = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction="optimizer-step"))
    with_flag = probe.update_direction(batch)
    for group in optimizer.param_groups:
        del group["decoupled_weight_decay"]  # as an AdamW of torch 2.4-2.6 holds its groups
    without_flag = probe.update_direction(batch)
    for name in with_flag:
        assert torch.equal(with_flag[name], without_flag[name]), name


# ---- the edges of the rules, one property each (mutants of them survived, docs/mutation.md) ----------
@pytest.mark.parametrize(
    "scale,max_norm",
    [(1.0, 1e-3), (1e-6, 1e-6), (1e-3, 1.0), (1.0, None), ("none", 1e-3)],
    ids=["clipped", "norm-at-the-1e-6-guard", "below-max-capped-at-1", "no-clipping", "no-gradient"],
)
def test_clip_coefficient_is_clip_grad_norm_s_factor(scale, max_norm):
    """The factor the rule scales the gradient by is exactly what torch.nn.utils.clip_grad_norm_ multiplies
    every gradient by (run on copies): the 1e-6 guard in its denominator matters at small norms, the factor
    is capped at 1 below max_norm, and with no gradient at all nothing is scaled."""
    from entropy_probe.direction import _clip_coefficient

    gen = torch.Generator().manual_seed(0)
    if scale == "none":
        grads = {"a": None, "b": None}
    else:
        grads = {
            "a": scale * torch.randn(3, 4, generator=gen),
            "b": None,
            "c": scale * torch.randn(5, generator=gen),
        }
    factor = _clip_coefficient(grads, max_norm)
    present = [g for g in grads.values() if g is not None]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in present]
    for p, g in zip(params, present):
        p.grad = g.clone()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p, g in zip(params, present):
        torch.testing.assert_close(factor * g, p.grad, rtol=1e-6, atol=0.0)
    if not present:
        assert factor == 1.0


def test_a_given_direction_carries_nothing_for_the_jackknife_over_u():
    """v given by the caller (``run(direction=v)``) has no U behind it: no gradient, batch, coefficients or
    units for se_total, and no caveat; it is the caller's v, in fp32 on the parameters' device."""
    from entropy_probe.direction import given_direction

    model = TinyLM(seed=7)
    params = trainable(model)
    v = {name: torch.ones_like(p, dtype=torch.float64) for name, p in params.items()}
    d = given_direction(v, params)
    assert d.grad_j is None and d.batch is None and d.coeff is None and d.n_units == 0 and d.caveat is None
    for name, p in params.items():
        assert d.v[name].dtype == torch.float32 and torch.equal(d.v[name], torch.ones_like(p))


def test_adam_without_the_decoupled_flag_is_still_coupled():
    """The mirror of the AdamW case: an Adam of torch 2.4-2.6 holds no ``decoupled_weight_decay`` key and
    its weight decay is L2 (added to the gradient), so its step must not change when the key is absent."""
    model = TinyLM(seed=8)
    case = StepCase("Adam", 2, 2)
    optimizer = make_optimizer(model, case)
    for k in range(2):
        real_step(model, optimizer, random_batch(4, seed=80 + k), case)
    batch = random_batch(4, seed=81)
    probe = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction="optimizer-step"))
    with_flag = probe.update_direction(batch)
    for group in optimizer.param_groups:
        del group["decoupled_weight_decay"]
    without_flag = probe.update_direction(batch)
    for name in with_flag:
        assert torch.equal(with_flag[name], without_flag[name]), name


def test_adam_preconditioned_without_an_optimizer_is_a_fresh_adam_step():
    """With no optimizer, "adam-preconditioned" is the first step of a fresh torch.optim.Adam with its
    defaults (lr = eta): theta + eta v equals the parameters that real step produces on -J_U."""
    eta = 1e-2
    model, batch = TinyLM(seed=9), random_batch(4, seed=90)
    v = ep.EntropyProbe(
        model, config=ep.ProbeConfig(lr=eta, direction="adam-preconditioned")
    ).update_direction(batch)
    before = {name: p.detach().clone() for name, p in trainable(model).items()}
    real_step(model, torch.optim.Adam(model.parameters(), lr=eta), batch, StepCase("Adam", 0, 1))
    for name, p in trainable(model).items():
        torch.testing.assert_close(before[name] + eta * v[name], p.detach(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kind", ["sgd", "adam-preconditioned", "optimizer-step"])
def test_a_parameter_the_optimizer_does_not_hold_does_not_move(kind):
    """optimizer.step() leaves a trainable parameter outside its groups where it is: every rule gives it
    v = 0, while the parameters it holds move."""
    model = TinyLM(seed=10)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=1.0)  # a rate of 1 is a rate like any other
    v = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction=kind)).update_direction(
        random_batch(4, seed=100)
    )
    held = {name for name, p in model.named_parameters() if any(p is q for q in model.head.parameters())}
    for name, t in v.items():
        assert (torch.count_nonzero(t) > 0) == (name in held), name


def test_a_frozen_parameter_first_in_a_group_does_not_stop_the_rest():
    """A parameter with requires_grad=False is skipped by optimizer.step(), and only it: the parameters
    after it in the same group still move."""
    model = TinyLM(seed=11)
    model.tok.requires_grad_(False)  # the first parameter of the only group
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    v = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction="optimizer-step")).update_direction(
        random_batch(4, seed=110)
    )
    assert set(v) == set(trainable(model)) and "tok" not in v
    assert all(torch.count_nonzero(t) > 0 for t in v.values())


def _message(call) -> str:
    with pytest.raises(ValueError) as caught:
        call()
    return str(caught.value)


def test_refusals_read_whole():
    """Each refusal names the field and the cause and ends with what to do, with nothing before or after
    (the probe's messages are read by people; a stray word in one is a bug like any other)."""
    from entropy_probe.direction import _require_adam, build_direction, given_direction, optimizer_hyper

    model = TinyLM(seed=12)
    params = trainable(model)
    stranger = torch.nn.Parameter(torch.zeros(2, 3))
    adam = torch.optim.Adam([{"params": list(model.parameters())}, {"params": [stranger]}])
    upside = torch.optim.Adam(model.parameters(), maximize=True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    ones = {name: torch.ones_like(p) for name, p in params.items()}
    cases = [
        (
            lambda: optimizer_hyper(params, upside, 1.0),
            "optimizer.param_groups[0] has maximize=True; the probe follows the convention loss = -J "
            "(minimised); use maximize=False",
        ),
        (
            lambda: optimizer_hyper(params, adam, 1.0),
            "optimizer.param_groups[1]['params'][0] (shape (2, 3)) is not a trainable parameter of the "
            "model; the optimizer must hold the model's parameters",
        ),
        (
            lambda: _require_adam(None, "optimizer-step"),
            "direction='optimizer-step' needs an optimizer (torch.optim.Adam or AdamW); none was given",
        ),
        (
            lambda: _require_adam(sgd, "adam-preconditioned"),
            "direction='adam-preconditioned' supports torch.optim.Adam and AdamW; got SGD "
            "(direction='optimizer-copy' takes the step of any torch.optim optimizer)",
        ),
        (
            lambda: build_direction("optimizer-copy", {}, params, None, 1.0),
            "direction='optimizer-copy' needs the run's optimizer; none was given",
        ),
        (
            lambda: given_direction([1.0], params),
            "direction must be a dict {name: tensor} from update_direction(), got list",
        ),
        (
            lambda: given_direction({}, params),
            "direction does not match the model's trainable parameters: missing ['head.bias', 'head.weight', "
            "'hidden.bias']..., unknown []",
        ),
        (
            lambda: given_direction({k: v for k, v in ones.items() if not k.startswith("h")}, params),
            "direction does not match the model's trainable parameters: "
            "missing ['head.bias', 'head.weight', 'hidden.bias']..., unknown []",  # 4 missing: '...'
        ),
        (
            lambda: given_direction(
                {k: v for k, v in ones.items() if k not in ("head.bias", "hidden.bias")}, params
            ),
            "direction does not match the model's trainable parameters: "
            "missing ['head.bias', 'hidden.bias'], unknown []",
        ),
        (
            lambda: given_direction(
                {k: v for k, v in ones.items() if k in ("tok", "pos", "hidden.weight")}, params
            ),
            "direction does not match the model's trainable parameters: "
            "missing ['head.bias', 'head.weight', 'hidden.bias'], unknown []",  # exactly 3: no '...'
        ),
        (
            lambda: given_direction({**ones, **{f"x{i}": ones["tok"] for i in range(3)}}, params),
            "direction does not match the model's trainable parameters: "
            "missing [], unknown ['x0', 'x1', 'x2']",
        ),
        (
            lambda: given_direction({**ones, **{f"x{i}": ones["tok"] for i in range(4)}}, params),
            "direction does not match the model's trainable parameters: missing [], "
            "unknown ['x0', 'x1', 'x2']...",
        ),
        (
            lambda: given_direction({**ones, "tok": torch.ones(3)}, params),
            "direction['tok'] has shape (3,), the parameter has (7, 8)",
        ),
        (
            lambda: given_direction({**ones, "tok": 1.0}, params),
            "direction['tok'] has shape float, the parameter has (7, 8)",
        ),
        (
            lambda: given_direction({**ones, "pos": torch.full((16, 8), float("nan"))}, params),
            "direction['pos'] is not finite",
        ),
    ]
    for call, expected in cases:
        assert _message(call) == expected


def test_step_mismatch_names_the_group_and_the_setting():
    """Why a rule is not the optimizer's step, per case, read whole: the optimizer, the group and the
    setting; None exactly when the rule is that step (plain SGD, SGD momentum before its first buffer,
    Adam before its first step without weight decay, the optimizer's own rules, no optimizer)."""
    from entropy_probe.direction import step_mismatch

    def stepped(opt):  # one real step: momentum buffers and Adam's step count exist afterwards
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
        return opt

    def two(cls, second: dict, **kw):  # two groups, the setting on the second
        a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
        return cls([{"params": [a]}, {"params": [b], **second}], **kw)

    sgd, adam = torch.optim.SGD, torch.optim.Adam
    cases = [
        ("sgd", two(sgd, {}, lr=0.1), None),
        ("sgd", two(sgd, {"momentum": 0.9}, lr=0.1), None),
        ("sgd", two(adam, {}), "Adam does not take the step -lr * grad"),
        ("sgd", two(sgd, {"weight_decay": 0.1}, lr=0.1), "SGD param_groups[1] has weight_decay=0.1"),
        (
            "sgd",
            two(sgd, {"momentum": 0.9, "nesterov": True}, lr=0.1),
            "SGD param_groups[1] has momentum=0.9 (a momentum buffer or Nesterov)",
        ),
        (
            "sgd",
            stepped(two(sgd, {"momentum": 0.9}, lr=0.1)),
            "SGD param_groups[1] has momentum=0.9 (a momentum buffer or Nesterov)",
        ),
        (
            "sgd",
            stepped(two(sgd, {"momentum": 1.0}, lr=0.1)),
            "SGD param_groups[1] has momentum=1.0 (a momentum buffer or Nesterov)",
        ),
        ("adam-preconditioned", two(adam, {}), None),
        (
            "adam-preconditioned",
            two(adam, {"weight_decay": 0.1}),
            "Adam param_groups[1] has weight_decay=0.1",
        ),
        (
            "adam-preconditioned",
            stepped(two(adam, {})),
            "Adam param_groups[0] is past its first step (momentum and bias correction)",
        ),
        ("optimizer-step", stepped(two(adam, {"weight_decay": 0.1})), None),
        ("optimizer-copy", stepped(two(sgd, {"momentum": 0.9}, lr=0.1)), None),
        ("adam-preconditioned", None, None),
    ]
    for kind, opt, expected in cases:
        assert step_mismatch(kind, opt) == expected, (kind, opt)


def test_adam_with_decoupled_weight_decay_is_adamw():
    """``torch.optim.Adam(decoupled_weight_decay=True)`` (torch >= 2.7) takes AdamW's step: the probe reads
    the group's flag, so its v is AdamW's (whose v is the real step, above), not L2-coupled Adam's."""
    batch = random_batch(4, seed=130)
    vs = []
    for make in (
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1),
    ):
        model = TinyLM(seed=13)
        probe = ep.EntropyProbe(model, make(model.parameters()), ep.ProbeConfig(direction="optimizer-step"))
        vs.append(probe.update_direction(batch))
    decoupled, adamw, coupled = vs
    for name in adamw:
        torch.testing.assert_close(decoupled[name], adamw[name], rtol=1e-6, atol=0.0)
    assert any(not torch.allclose(coupled[n], adamw[n], rtol=1e-3, atol=0.0) for n in adamw)  # it matters


def test_adam_rules_refuse_an_optimizer_without_adam_s_settings_from_grad():
    """From ``.grad`` too, "adam-preconditioned" on an optimizer that is not Adam (Rprop: no betas, eps or
    weight_decay in its groups) is a ValueError naming it, not a KeyError from a missing setting."""
    model = TinyLM(seed=14)
    optimizer = torch.optim.Rprop(model.parameters(), lr=1e-2)
    sum(p.square().sum() for p in model.parameters()).backward()
    probe = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction="adam-preconditioned"))
    with pytest.raises(ValueError, match=r"supports torch\.optim\.Adam and AdamW; got Rprop"):
        probe.run(eval_batch=random_batch(4, seed=140), from_grad=True)


@pytest.mark.parametrize("opt", ["Adam", "AdamW"])
def test_weight_decay_of_exactly_one_is_applied(opt):
    """Adam's L2 decay (in the gradient) and AdamW's decoupled decay (on theta) act at any strength, 1.0
    included: theta + eta v is the real step."""
    model = TinyLM(seed=15)
    optimizer = getattr(torch.optim, opt)(model.parameters(), lr=1e-2, weight_decay=1.0)
    case = StepCase(opt, 1, 1)
    real_step(model, optimizer, random_batch(4, seed=150), case)
    batch = random_batch(4, seed=151)
    v = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction="optimizer-step")).update_direction(batch)
    predicted = torch.cat([(p.detach() + 1e-2 * v[n]).reshape(-1) for n, p in model.named_parameters()])
    real_step(model, optimizer, batch, case)
    after = flat_params(model)
    assert float((after - predicted).norm()) < 1e-6 * float(after.norm())
