"""se_total's calibration on tabular policies the tests were not tuned on (issue 23), one JSON record.

    PYTHONPATH=src python benchmarks/se_total_unseen.py --pairs 300 --record docs/records/se_total_unseen.json

For each case of ``--grid`` (direction rule, policy seed, policy scale, B_E) it runs ``--pairs``
independent (U, E) pairs and records ``var(delta_h1) / mean(se_total^2)`` with its kurtosis-widened
chi-square band (``validation.checks.variance_check``), and V_U's own share: the mean ``var_update``
over the variance over U implied by the pairs, ``var(delta_h1) - mean(var_cond_e)`` (noisy where
var_cond_e dominates, at B_E = 16). The policy seeds (5, 9) and scales are not those the estimator
was chosen on (1-4) nor those of tests/test_se_total.py (0, 13).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from entropy_probe.config import ProbeConfig
from entropy_probe.loss import policy_loss
from entropy_probe.probe import EntropyProbe
from entropy_probe.records import pop_record_option, write_record
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
        eval_units=eval_units,
        update_units=update_units,
        pairs=pairs,
        ratio=check.figures["ratio"],
        band=check.figures["interval"],
        passed=check.passed,
        implied_var_u=emp - sum(vce) / pairs,
        mean_var_update=sum(vu) / pairs,
        var_update_over_implied=sum(vu) / pairs / (emp - sum(vce) / pairs),
        seconds=time.perf_counter() - t0,
    )


FRESH = ("adam-preconditioned", 0)
# the smallest grid that meets issue 23: fresh Adam on four unseen (seed, scale) policies at B_E = 64,
# where V_U dominates se_total^2, and two at B_E = 16; the other rules on two policies, B_E 64 and 16
GRID = ",".join(
    (
        "fresh:5:0.5:64",
        "fresh:9:0.5:64",
        "fresh:5:1.0:64",
        "fresh:9:1.0:64",
        "fresh:5:1.0:16",
        "fresh:9:0.5:16",
    )
    + ("others:9:0.5:64", "others:5:1.0:16")
)


def cases(grid: str):
    """``(direction, warm, seed, scale, B_E)`` for each ``rules:seed:scale:B_E`` of ``grid``."""
    others = tuple(c for c in SE_TOTAL_CASES if c != FRESH)
    for item in grid.split(","):
        rules, seed, scale, n_eval = item.split(":")
        for direction, warm in {"fresh": (FRESH,), "others": others, "all": (FRESH,) + others}[rules]:
            yield direction, warm, int(seed), float(scale), int(n_eval)


def main() -> None:
    argv, record = pop_record_option(sys.argv[1:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--grid", default=GRID, help="rules:seed:scale:B_E,... with rules fresh, others or all")
    ap.add_argument("--update-units", type=int, default=8)
    ap.add_argument("--machine", default="shared 2-core CPU")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    records = []
    for direction, warm, seed, scale, n_eval in cases(a.grid):
        rec = one_case(direction, warm, seed, scale, a.pairs, a.update_units, n_eval)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        if record is not None:  # after every case: a long run that is cut short keeps what it measured
            write_record(
                record,
                ["benchmarks/se_total_unseen.py", *sys.argv[1:]],
                dict(machine=a.machine, records=records),
            )


if __name__ == "__main__":
    main()
