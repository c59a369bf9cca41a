"""Cost of ``direction="optimizer-copy"`` (the step of any torch.optim optimizer, taken by a copy) against
the closed-form ``"optimizer-step"`` (Adam/AdamW only) and one real ``optimizer.step()``, in one process.

    PYTHONPATH=src python benchmarks/bench_optimizer_copy.py [--width 1024 --layers 8 --repeats 5]

Model: ``layers`` Linear(width, width) layers (8 x 1024: 8.4M parameters, 33.6 MB in fp32), a random
``.grad`` on every parameter, the optimizer warmed by 2 real steps. Time: median wall time of
``repeats`` calls (``direction_from_grad``: v from ``-grad``, the whole rule). Memory: peak resident set
above the baseline (``bench_engines.peak_extra_mib``), as a multiple of the fp32 parameter bytes.
Writes ``runs/bench/bench_optimizer_copy.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from entropy_probe.from_grad import direction_from_grad

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import peak_extra_mib  # noqa: E402

OPTIMIZERS = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.01),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    params = dict(model.named_parameters())
    param_bytes = 4 * sum(p.numel() for p in params.values())
    rows = []
    for name, make in OPTIMIZERS.items():
        opt = make(model.parameters())
        for _ in range(2):  # warm state
            for p in params.values():
                p.grad = torch.randn_like(p) * 1e-2
            opt.step()
        lr = opt.param_groups[0]["lr"]
        rules = ["optimizer-copy"] + (["optimizer-step"] if name == "AdamW" else [])
        row = {"optimizer": name, "step_s": median_seconds(opt.step, args.repeats)}
        row["step_peak_x"] = peak_extra_mib(opt.step, "cpu") * 2**20 / param_bytes
        for rule in rules:
            call = lambda: direction_from_grad(rule, params, opt, lr)  # noqa: E731
            row[f"{rule}_s"] = median_seconds(call, args.repeats)
            row[f"{rule}_peak_x"] = peak_extra_mib(call, "cpu") * 2**20 / param_bytes
        rows.append(row)
        print(
            f"{name:14s} step {row['step_s'] * 1e3:7.1f} ms (peak {row['step_peak_x']:.2f}x)  "
            + "  ".join(
                f"{r} {row[f'{r}_s'] * 1e3:7.1f} ms = {row[f'{r}_s'] / row['step_s']:.1f}x step "
                f"(peak {row[f'{r}_peak_x']:.2f}x params)"
                for r in rules
            )
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"width": args.width, "layers": args.layers, "param_bytes": param_bytes, "rows": rows}
    (out / "bench_optimizer_copy.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
