"""se_total's calibration on tabular policies the tests were not tuned on (issue 23), one JSON record.

    PYTHONPATH=src python benchmarks/se_total_unseen.py --pairs 300 --out /tmp/se_total_unseen.json

For each (direction rule, policy seed, policy scale) it runs ``--pairs`` independent (U, E) pairs and
records ``var(delta_h1) / mean(se_total^2)`` with its kurtosis-widened chi-square band
(``validation.checks.variance_check``), and the jackknife's own share: the variance over U implied by the
pairs, ``var(delta_h1) - mean(var_cond_e)``, over the mean jackknife ``var_update``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from entropy_probe.config import ProbeConfig
from entropy_probe.loss import policy_loss
from entropy_probe.probe import EntropyProbe
from entropy_probe.toy import TabularPolicy, sample_enumerated
from entropy_probe.validation.calibration import CLIP, LR, SE_TOTAL_CASES
from entropy_probe.validation.checks import variance_check
from entropy_probe.validation.stats import excess_kurtosis, tolerance_k


def _probe(direction: str, warm_steps: int, seed: int, scale: float) -> EntropyProbe:
    policy = TabularPolicy(seed=seed, scale=scale)
    optimizer = None
    if direction != "sgd":
        optimizer = torch.optim.AdamW(policy.parameters(), lr=LR, weight_decay=0.01)
        for k in range(warm_steps):
            optimizer.zero_grad()
            policy_loss(policy, sample_enumerated(policy, 8, seed=20_000 + k), ProbeConfig()).backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    clip = CLIP if direction == "optimizer-step" else None
    return EntropyProbe(policy, optimizer, ProbeConfig(lr=LR, direction=direction, max_grad_norm=clip))


def one_case(direction, warm, seed, scale, pairs, update_units, eval_units) -> dict:
    probe, t0 = _probe(direction, warm, seed, scale), time.perf_counter()
    d, s2, vce, vu = [], [], [], []
    base = 7_000_019 * (seed + 1)
    for k in range(pairs):
        r = probe.run(
            sample_enumerated(probe.model, update_units, seed=base + 2 * k),
            sample_enumerated(probe.model, eval_units, seed=base + 2 * k + 1),
        )
        d.append(r.delta_h1), s2.append(r.se_total**2), vce.append(r.var_cond_e), vu.append(r.var_update)
    check = variance_check("se_total", d, s2, excess_kurtosis(d), 1, tolerance_k(1))
    mean = sum(d) / pairs
    emp = sum((x - mean) ** 2 for x in d) / (pairs - 1)
    return dict(
        direction=direction,
        warm_steps=warm,
        policy_seed=seed,
        policy_scale=scale,
        pairs=pairs,
        ratio=check.figures["ratio"],
        band=check.figures["interval"],
        passed=check.passed,
        implied_var_u=emp - sum(vce) / pairs,
        mean_var_update=sum(vu) / pairs,
        seconds=time.perf_counter() - t0,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--seeds", default="5,9")
    ap.add_argument("--scales", default="1.0,0.5")
    ap.add_argument("--cases", default="all", help="'all', 'fresh' (fresh Adam only) or 'others'")
    ap.add_argument("--update-units", type=int, default=8)
    ap.add_argument("--eval-units", type=int, default=16)
    ap.add_argument("--out", default="se_total_unseen.json")
    a = ap.parse_args()
    fresh = (("adam-preconditioned", 0),)  # the case of the issue first
    others = tuple(c for c in SE_TOTAL_CASES if c not in fresh)
    cases = {"all": fresh + others, "fresh": fresh, "others": others}[a.cases]
    records = []
    for direction, warm in cases:
        for seed in map(int, a.seeds.split(",")):
            for scale in map(float, a.scales.split(",")):
                rec = one_case(direction, warm, seed, scale, a.pairs, a.update_units, a.eval_units)
                print(json.dumps(rec), flush=True)
                records.append(rec)
                with open(a.out, "w") as f:
                    json.dump(dict(args=vars(a), records=records), f, indent=1)


if __name__ == "__main__":
    main()
