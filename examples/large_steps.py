"""Large steps on an exactly enumerable GPT-2 (DESIGN section 21, docs/large_steps.md).

A fresh AdamW's first step from the trainer's ``.grad`` (GRPO surrogate on U, 16 units), lr 1e-3 to
1e-1, many independent E draws of B_E = 32 units (G = 4). For every draw: the probe's ``reliable``
flag before the step, its ``prediction`` and ``prediction_interval(0.95)``, the lookahead's SE, and the
exact entropy change of the step (enumeration of every response). Done when (the issue): in >= 90% of
draws the result is flagged before the step, or its prediction interval covers the exact change while
its SE is no more than twice the functional step's own (the lookahead's); at the smallest lr the flag
stays off in >= 90% of draws. With ``--guard`` also the guard's within-budget rate: the exact change
of the step the guard lets through (lr x scale) against the budget.

    PYTHONPATH=src python examples/large_steps.py --draws 40 --out /tmp/large_steps
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import warnings
from pathlib import Path

import torch

import entropy_probe as ep
from entropy_probe.lookahead import taylor_forecast
from entropy_probe.toy import EnumerableGPT2, exact_entropy, sample_enumerated

LRS = (1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 3e-2, 1e-1)


def exact_change(model, lr: float) -> float:
    """The exact entropy change of AdamW's first step at ``lr`` from the model's ``.grad`` (on a copy)."""
    stepped = copy.deepcopy(model)
    for p, q in zip(model.parameters(), stepped.parameters()):
        q.grad = p.grad.clone()
    torch.optim.AdamW(stepped.parameters(), lr=lr).step()
    with torch.no_grad():
        return float(exact_entropy(stepped)) - float(exact_entropy(model))


def one_lr(lr: float, init: float, draws: int, second_order: bool, guard: ep.EntropyGuard | None) -> dict:
    model = EnumerableGPT2(seed=0, init=init)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    ep.policy_loss(model, sample_enumerated(model, 16, 4, seed=1), ep.ProbeConfig()).backward()
    exact = exact_change(model, lr)
    cfg = ep.ProbeConfig(  # the sequence functional: the exact change above is of it (toy.exact_entropy)
        direction="optimizer-step",
        engine="jvp",
        second_order=second_order,
        lookahead="always",
        entropy="sequence",
    )
    probe, rows = ep.EntropyProbe(model, opt, cfg), []
    for d in range(draws):
        evaluation = sample_enumerated(model, 32, 4, seed=10_000 + d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = probe.run(eval_batch=evaluation, from_grad=True)
        # the Taylor forecast "auto" predicts with when the step is not flagged (with the second order: the
        # first order where the second-order term outgrew the first)
        taylor, taylor_se, method = taylor_forecast(r.first, r.second)
        lo, hi = r.forecast_interval(0.95) if method == "second-order" else r.interval(0.95)
        row = dict(
            reliable=r.reliable,
            ess_fraction=r.prediction.ess_fraction,
            taylor=taylor,
            taylor_se=taylor_se,
            taylor_method=method,
            taylor_covers=lo <= exact <= hi,
            lookahead=r.lookahead.delta_h,
            lookahead_se=r.lookahead.se,
            lookahead_reliable=r.lookahead.reliable,
            lookahead_covers=abs(r.lookahead.delta_h - exact) <= 1.959964 * r.lookahead.se,
        )
        # the Done-when criterion for the Taylor forecast the probe would use when it is not flagged
        row["ok"] = (not r.reliable) or (row["taylor_covers"] and taylor_se <= 2 * r.lookahead.se)
        if guard is not None:  # the guard reads the result of the default lookahead="auto"
            auto = ep.EntropyProbe(model, opt, dataclasses.replace(cfg, lookahead="auto"))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decision = guard.decide(auto.run(eval_batch=evaluation, from_grad=True))
            row["guard_scale"], row["guard_reason"] = decision.scale, decision.reason
            row["guard_exact"] = exact_change(model, lr * decision.scale)
            row["within_budget"] = row["guard_exact"] >= -guard.max_drop
        rows.append(row)
    return dict(lr=lr, exact=exact, rows=rows, **summary(rows))


def summary(rows: list[dict]) -> dict:
    def mean(key: str, sub: list[dict] = rows) -> float:
        return statistics.mean(float(r[key]) for r in sub) if sub else float("nan")

    kept = [r for r in rows if r["reliable"]]
    out = dict(
        ok_rate=mean("ok"),
        flag_off_rate=mean("reliable"),
        taylor_coverage_when_reliable=mean("taylor_covers", kept),
        lookahead_coverage=mean("lookahead_covers"),
        median_ess_fraction=statistics.median(r["ess_fraction"] for r in rows),
    )
    if "within_budget" in rows[0]:
        out["within_budget_rate"] = mean("within_budget")
        out["median_guard_scale"] = statistics.median(r["guard_scale"] for r in rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--inits", type=float, nargs="+", default=[0.02, 0.3])
    parser.add_argument("--second-order", action="store_true")
    parser.add_argument("--guard", type=float, default=None, help="max_drop of an EntropyGuard (nats)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    guard = None if args.guard is None else ep.EntropyGuard(max_drop=args.guard)
    record = dict(draws=args.draws, second_order=args.second_order, guard_max_drop=args.guard, runs=[])
    for init in args.inits:
        for lr in LRS:
            run = one_lr(lr, init, args.draws, args.second_order, guard)
            record["runs"].append(dict(init=init, **run))
            figures = {k: v for k, v in run.items() if k not in ("rows", "lr")}
            print(f"init {init} lr {lr:g}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"large_steps{'_second' if args.second_order else ''}{'_guard' if guard else ''}.json"
    (args.out / name).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
