"""What the second order and the attribution by group cost, against the probe's E pass (docs/performance.md).

Run:  PYTHONPATH=src python benchmarks/bench_second_order.py [--quick] [--device cuda] [--out runs/bench]

Same models, batches and clocks as ``bench_engines.py`` (CPU: 1 torch thread, process CPU time; CUDA:
wall clock; the fastest of --repeats interleaved rounds after a warm-up), B_E = 16 units x G = 8.
Contenders, each a full pass over the same E:

- **backward**: the E pass of the default engine (every s_n, then the moments), no groups;
- **backward + groups**: the same with ``by_group`` (one dot per parameter, summed per group);
- **jvp**: the jvp engine's E pass (4 units per forward-mode pass);
- **jvp per group**: the jvp engine once per parameter group, v restricted to the group (the
  alternative to the backward loop for by_group under ``engine="jvp"``);
- **second order**: the nested forward-mode pass giving every q_n (4 units per pass).

The default of ``ProbeConfig.second_order`` follows the issue's rule: on if the second-order pass
costs at most half the E pass. Writes ``<out>/bench_second_order_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_engines import (
    CLOCK,
    CPU_SIZES,
    GPU_SIZES,
    build_model,
    parameters_of,
    random_direction,
    rollout_batch,
    timed,
    use_cpu_time,
)

from entropy_probe.attribution import parameter_groups
from entropy_probe.config import ProbeConfig
from entropy_probe.engines import backward, jvp, second_order

UNITS = 16


def contenders(model, params, batch, v) -> dict:
    cfg = ProbeConfig(microbatch_units=4)
    names, index = parameter_groups(params, None)
    restricted = []  # v restricted to each group, zero elsewhere
    for g in range(len(names)):
        restricted.append(
            {n: t if int(index[i]) == g else torch.zeros_like(t) for i, (n, t) in enumerate(v.items())}
        )
    return {
        "backward": lambda: backward.eval_projections(model, params, batch, v, cfg),
        "backward + groups": lambda: backward.eval_projections(
            model, params, batch, v, cfg, want_groups=True
        ),
        "jvp": lambda: jvp.eval_projections(model, params, batch, v, cfg),
        "jvp per group": lambda: [jvp.eval_projections(model, params, batch, r, cfg) for r in restricted],
        "second order": lambda: second_order.eval_second_order(model, params, batch, v, cfg),
    }, len(names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny model only, 1 round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
        use_cpu_time()
    sizes = (CPU_SIZES if args.device == "cpu" else GPU_SIZES)[: 1 if args.quick else None]
    repeats = 1 if args.quick else args.repeats
    console = Console()
    rows = []
    for size in sizes:
        model = build_model(size, args.device)
        params = parameters_of(model)
        batch = rollout_batch(size, UNITS, seed=0, device=args.device)
        v = random_direction(params)
        fns, n_groups = contenders(model, params, batch, v)
        best = timed(fns, args.device, repeats)
        rows.append(
            dict(
                size=size.name,
                arch=size.arch,
                n_groups=n_groups,
                seconds=best,
                second_over_backward=best["second order"] / best["backward"],
                second_over_jvp=best["second order"] / best["jvp"],
                groups_over_backward=best["backward + groups"] / best["backward"],
                jvp_groups_over_backward=best["jvp per group"] / best["backward"],
            )
        )
        console.print(f"{size.name}: " + ", ".join(f"{k} {t:.3f} s" for k, t in best.items()))
    table = Table(title=f"second order and by_group vs the E pass, B_E = {UNITS} x G = 8 ({CLOCK['name']})")
    for col in (
        "model",
        "groups",
        "2nd order / backward",
        "2nd order / jvp",
        "backward+groups / backward",
        "jvp per group / backward",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["size"],
            str(r["n_groups"]),
            f"{r['second_over_backward']:.2f}",
            f"{r['second_over_jvp']:.2f}",
            f"{r['groups_over_backward']:.3f}",
            f"{r['jvp_groups_over_backward']:.2f}",
        )
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_second_order_{args.device.split(':')[0]}.json"
    path.write_text(
        json.dumps(dict(device=args.device, clock=CLOCK["name"], units=UNITS, rows=rows), indent=1)
    )
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
