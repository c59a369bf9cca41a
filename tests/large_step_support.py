"""The large-step tests' setting (DESIGN section 21): a fresh AdamW's first step on the exactly
enumerable GPT-2 of ``entropy_probe.toy``, and the exact entropy change it causes."""

from __future__ import annotations

import copy

import torch

import entropy_probe as ep
from entropy_probe.toy import EnumerableGPT2, exact_entropy, sample_enumerated


def first_adamw_step(lr: float, seed: int = 0, update_units: int = 16, init: float = 0.02):
    """A fresh AdamW about to take its first step from the trainer's ``.grad`` (GRPO surrogate on a
    sampled U), and the exact entropy change that step causes (enumeration, on a copy that really steps).

    Returns ``(model, optimizer, exact change)``; the model and optimizer are left before the step."""
    model = EnumerableGPT2(seed, init)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    update = sample_enumerated(model, update_units, 4, seed=seed + 1)
    ep.policy_loss(model, update, ep.ProbeConfig()).backward()
    stepped = copy.deepcopy(model)
    for p, q in zip(model.parameters(), stepped.parameters()):
        q.grad = p.grad.clone()  # deepcopy leaves .grad behind
    copy_opt = torch.optim.AdamW(stepped.parameters(), lr=lr)
    copy_opt.step()
    with torch.no_grad():
        exact = float(exact_entropy(stepped)) - float(exact_entropy(model))
    return model, opt, exact
