"""Direction rules against the optimizer they forecast (issue 23, DESIGN section 24).

``from_grad`` forecasts the step ``optimizer.step()`` takes. "sgd" on an optimizer that takes another
step (momentum, weight decay, Nesterov, Adagrad, RMSprop, Adam) is refused by name; "adam-preconditioned"
past Adam's first step warns and flags the result; "optimizer-copy" is the real step of any torch.optim
optimizer: ``theta + lr * v`` equals what a real ``optimizer.step()`` then produces.
Run: ``PYTHONPATH=src pytest -q tests/test_step_rules.py``.
"""

from __future__ import annotations

import pytest
import torch
from core_support import TinyLM, random_batch, trainable
from test_from_grad import assert_unchanged, snapshot, unmirrorable_backward

import entropy_probe as ep
from entropy_probe.from_grad import direction_from_grad

OPTIMIZERS = {
    "SGD-momentum-decay": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.05),
    "SGD-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "SGD-dampening": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.5, dampening=0.3),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05, weight_decay=0.01),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95), eps=1e-6),
    "AdamW-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True),
    "Adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-2),
    "NAdam": lambda ps: torch.optim.NAdam(ps, lr=1e-2),
    "RAdam": lambda ps: torch.optim.RAdam(ps, lr=1e-2),
}


def trained(make, warm_steps: int, two_groups: bool = True):
    """A model and its optimizer after ``warm_steps`` real steps, with a fresh .grad on the parameters."""
    model = TinyLM(seed=1)
    params = list(model.parameters())
    groups = [{"params": params[:3]}, {"params": params[3:], "lr": 3e-3}] if two_groups else params
    opt = make(groups)
    for k in range(warm_steps):
        opt.zero_grad()
        unmirrorable_backward(model, random_batch(4, seed=100 + k), clip=None)
        opt.step()
    opt.zero_grad()
    unmirrorable_backward(model, random_batch(5, seed=7), clip=None)
    model.hidden.bias.grad = None  # a parameter the step skips: v must be 0 there
    return model, opt


@pytest.mark.parametrize("warm_steps", [0, 3])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_copy_is_the_real_step(name, warm_steps):
    model, opt = trained(OPTIMIZERS[name], warm_steps)
    lr = opt.param_groups[0]["lr"]
    before = snapshot(model, opt)
    v = direction_from_grad("optimizer-copy", trainable(model), opt, lr).v
    result = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-copy")).run(
        eval_batch=random_batch(4, seed=11), from_grad=True
    )
    assert_unchanged(before, model, opt)  # parameters, .grad, optimizer state, RNG, modes
    # the rule is the optimizer's step: no caveat (RMSprop's first steps are large enough that the
    # large-step diagnostic may flag them; that is result.prediction's business, not the rule's)
    assert result.caveats == () and result.lr == lr
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()  # the real step
    assert torch.count_nonzero(v["hidden.bias"]) == 0
    for n, p in model.named_parameters():
        real = p.detach() - theta[n]
        torch.testing.assert_close(lr * v[n], real, rtol=1e-5, atol=1e-7 * float(theta[n].abs().max()))


@pytest.mark.parametrize("warm_steps", [0, 2])
def test_optimizer_copy_equals_the_closed_form_adam_step(warm_steps):
    model, opt = trained(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), warm_steps)
    lr = opt.param_groups[0]["lr"]
    closed = direction_from_grad("optimizer-step", trainable(model), opt, lr).v
    copied = direction_from_grad("optimizer-copy", trainable(model), opt, lr).v
    for n, p in model.named_parameters():
        # the copy's v is read from theta_next - theta in fp32: it carries theta's rounding, divided by lr
        resolution = 2 * torch.finfo(torch.float32).eps * float(p.detach().abs().max()) / lr
        torch.testing.assert_close(copied[n], closed[n], rtol=1e-5, atol=resolution)


REFUSED = ["SGD-momentum-decay", "SGD-nesterov", "Adagrad", "RMSprop", "Adam"]


@pytest.mark.parametrize("name", REFUSED)
def test_sgd_rule_refuses_an_optimizer_that_takes_another_step(name):
    model, opt = trained(OPTIMIZERS[name], warm_steps=1)
    before = snapshot(model, opt)
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="sgd"))
    with pytest.raises(ValueError, match=r"from_grad: direction='sgd' .*optimizer-copy"):
        probe.run(eval_batch=random_batch(4, seed=11), from_grad=True)
    assert_unchanged(before, model, opt)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),  # no momentum buffer yet: the step is -lr g
    ],
    ids=["plain", "momentum-fresh"],
)
def test_sgd_rule_accepts_the_plain_sgd_step(make):
    model, opt = trained(make, warm_steps=0)
    r = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="sgd")).run(
        eval_batch=random_batch(4, seed=11), from_grad=True
    )
    copied = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-copy")).run(
        eval_batch=random_batch(4, seed=11), from_grad=True
    )
    assert r.reliable and copied.reliable
    # the same step to the fp32 rounding of theta that the copy's v carries: far below the SE
    assert abs(r.delta_h1 - copied.delta_h1) < 1e-3 * r.se_cond_e


def test_adam_preconditioned_past_the_first_step_warns_and_flags():
    model, opt = trained(OPTIMIZERS["Adam"], warm_steps=2)
    probe = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="adam-preconditioned"))
    with pytest.warns(
        RuntimeWarning, match=r"not the step the optimizer takes \(Adam param_groups\[0\] is past"
    ):
        r = probe.run(eval_batch=random_batch(4, seed=11), from_grad=True)
    assert r.reliable is False and "optimizer-step" in r.caveats[0]
    fresh_model, fresh = trained(OPTIMIZERS["Adam"], warm_steps=0)  # Adam's first step IS P * (-grad)
    r = ep.EntropyProbe(fresh_model, fresh, ep.ProbeConfig(direction="adam-preconditioned")).run(
        eval_batch=random_batch(4, seed=11), from_grad=True
    )
    assert r.reliable


def test_optimizer_copy_refusals():
    model, opt = trained(lambda ps: torch.optim.LBFGS(ps, lr=0.1), warm_steps=0, two_groups=False)
    with pytest.raises(ValueError, match=r"optimizer-copy.*LBFGS\.step\(\) needs a closure"):
        ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-copy")).run(
            eval_batch=random_batch(4, seed=11), from_grad=True
        )
    with pytest.raises(ValueError, match=r"direction='optimizer-copy' needs the run's optimizer"):
        ep.EntropyProbe(model, None, ep.ProbeConfig(lr=0.1, direction="optimizer-copy")).run(
            eval_batch=random_batch(4, seed=11), from_grad=True
        )


def test_optimizer_copy_from_an_update_batch_and_its_se_total():
    """U mode: v from grad J_U by a copy of the optimizer; the jackknife over U rebuilds it the same way."""
    model, opt = trained(OPTIMIZERS["RMSprop"], warm_steps=2)
    U, E = random_batch(4, seed=3), random_batch(4, seed=4)
    r = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-copy")).run(U, E)
    assert r.se_total is not None and r.se_total >= r.se_cond_e > 0
    v = ep.EntropyProbe(model, opt, ep.ProbeConfig(direction="optimizer-copy")).update_direction(U)
    opt.zero_grad()
    ep.policy_loss(model, U, ep.ProbeConfig()).backward()  # the gradient of the loss -J
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    lr = opt.param_groups[0]["lr"]
    for n, p in model.named_parameters():
        torch.testing.assert_close(lr * v[n], p.detach() - theta[n], rtol=1e-4, atol=1e-7)
