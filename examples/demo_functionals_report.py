"""docs/demo.md's 3-seed table: forecast against truth for both entropy functionals, from demo records.

    python examples/demo_functionals_report.py docs/records/demo_*_seed?.json \\
        --record docs/records/demo_functionals.json

Reads the records of ``entropy-probe demo --entropy {token,sequence} --seed S --record ...`` and prints,
per functional and seed and pooled over the seeds, for the first-order forecast ``delta_h1`` and the
forecast with the second order ``delta_h1 + delta_h2``:
- the z-scores ``(truth - forecast) / se_diff`` of the steps with a reliable truth (same E, paired SE):
  their SD (near 1 when the SEs are right and nothing systematic is left) and mean;
- the summed truth minus the summed forecast in units of its paired SE ``sqrt(sum se_diff^2)`` (within 2
  SE or not; pooled over seeds: the sums of the seeds over the root of their summed variances);
- the correlation of forecast and truth over steps, as measured (reliable steps);
- the fresh-sample check (SD of ``measured_z``), the probe's entropy minus the trainer's logged entropy
  (mean per step) and the wall time.
The table is markdown whose figures carry ``<!--fig RECORD KEY-->`` marks for the record written with
``--record`` (tests/doc_figures.py); the record's data holds every figure under ``<functional>.<seedS|all>``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

FUNCTIONALS = ("token", "sequence")
ORDERS = (("1", "forecast", "truth_se_diff"), ("2", "forecast2", "truth_se_diff2"))


def run_figures(data: dict) -> dict:
    """The figures of one demo run (its demo.json: ``data`` of its record)."""
    rows, s = data["steps"], data["summary"]
    kept = [r for r in rows if r["truth_reliable"]]
    truth = np.array([r["truth"] for r in kept])
    out = dict(steps=len(rows), reliable_steps=len(kept), runtime_s=data["runtime_s"])
    for k, forecast, se in ORDERS:
        z = (truth - np.array([r[forecast] for r in kept])) / np.array([r[se] for r in kept])
        gap = sum(r["truth"] - r[forecast] for r in rows)
        gap_se = math.sqrt(sum(r[se] ** 2 for r in rows))
        out.update(
            {
                f"z{k}": z.tolist(),
                f"z{k}_sd": float(np.std(z, ddof=1)),
                f"z{k}_mean": float(np.mean(z)),
                f"sum_gap{k}": gap,
                f"sum_gap{k}_se": gap_se,
                f"sum_gap{k}_in_se": gap / gap_se,
                f"correlation{k}": float(np.corrcoef(np.array([r[forecast] for r in kept]), truth)[0, 1]),
            }
        )
    out.update(
        sum_truth=s["sum_truth"],
        sum_forecast=s["sum_forecast"],
        sum_forecast2=s["sum_forecast2"],
        measured_z_sd=s["measured_z_sd"],
        probe_minus_logged=s.get("probe_minus_logged", math.nan),
    )
    return out


def pooled(runs: list[dict]) -> dict:
    """Over seeds: the z-scores together, the summed gaps over the root of their summed variances."""
    out = dict(steps=sum(r["steps"] for r in runs), reliable_steps=sum(r["reliable_steps"] for r in runs))
    for k, _, _ in ORDERS:
        z = np.concatenate([r[f"z{k}"] for r in runs])
        gap = sum(r[f"sum_gap{k}"] for r in runs)
        gap_se = math.sqrt(sum(r[f"sum_gap{k}_se"] ** 2 for r in runs))
        out.update(
            {
                f"z{k}_sd": float(np.std(z, ddof=1)),
                f"z{k}_mean": float(np.mean(z)),
                f"sum_gap{k}": gap,
                f"sum_gap{k}_se": gap_se,
                f"sum_gap{k}_in_se": gap / gap_se,
                f"correlation{k}_mean": float(np.mean([r[f"correlation{k}"] for r in runs])),
            }
        )
    out.update(
        measured_z_sd_mean=float(np.mean([r["measured_z_sd"] for r in runs])),
        probe_minus_logged_mean=float(np.mean([r["probe_minus_logged"] for r in runs])),
        runtime_s=sum(r["runtime_s"] for r in runs),
    )
    return out


# (row label, key in a seed's figures, key in the pooled figures, format)
ROWS = (
    ("SD of z = (truth - forecast) / se_diff, 1st order", "z1_sd", "z1_sd", ".2f"),
    ("SD of z, with 2nd order", "z2_sd", "z2_sd", ".2f"),
    ("mean of z, 1st order", "z1_mean", "z1_mean", "+.2f"),
    ("mean of z, with 2nd order", "z2_mean", "z2_mean", "+.2f"),
    ("summed truth - summed forecast, in SE, 1st order", "sum_gap1_in_se", "sum_gap1_in_se", "+.1f"),
    ("summed truth - summed forecast, in SE, 2nd order", "sum_gap2_in_se", "sum_gap2_in_se", "+.1f"),
    ("correlation forecast / truth, 1st order (pooled: mean)", "correlation1", "correlation1_mean", ".3f"),
    ("correlation, with 2nd order (pooled: mean)", "correlation2", "correlation2_mean", ".3f"),
    ("SD of the fresh-sample z (pooled: mean)", "measured_z_sd", "measured_z_sd_mean", ".2f"),
    ("probe - logged entropy, nats (pooled: mean)", "probe_minus_logged", "probe_minus_logged_mean", "+.4f"),
    ("steps with a reliable truth", "reliable_steps", "reliable_steps", "d"),
    ("wall time, s (pooled: sum)", "runtime_s", "runtime_s", ".0f"),
)  # fmt: skip


def _cell(value, fmt: str, record: str | None, key: str) -> str:
    text = format(value, fmt).replace("-", "\u2212") if fmt != "d" else str(value)
    if record is None or not math.isfinite(value):
        return text
    return f"{text}<!--fig {record} {key}-->"


def table(data: dict, record: str | None) -> str:
    """Markdown: one row per figure, one column per (functional, seed), and each functional pooled."""
    cols = [(f, seed) for f in FUNCTIONALS for seed in [*sorted(k for k in data[f] if k != "all"), "all"]]
    head = [f"{f} {'pooled' if seed == 'all' else seed.replace('seed', 'seed ')}" for f, seed in cols]
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, key, pooled_key, fmt in ROWS:
        cells = []
        for f, seed in cols:
            k = pooled_key if seed == "all" else key
            cells.append(_cell(data[f][seed][k], fmt, record, f"{f}.{seed}.{k}"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def collect(paths: list[Path]) -> dict:
    """``{functional: {seedS: figures, all: pooled}}`` from the demo records at ``paths``."""
    data: dict = {f: {} for f in FUNCTIONALS}
    for path in paths:
        run = json.loads(path.read_text())["data"]
        functional = run["config"].get("entropy", "sequence")  # records before --entropy: sequence
        data[functional][f"seed{run['config']['seed']}"] = run_figures(run)
    for f in FUNCTIONALS:
        if not data[f]:
            raise ValueError(f"no demo record with entropy={f!r} among {[str(p) for p in paths]}")
        data[f]["all"] = pooled([data[f][k] for k in sorted(data[f])])
    data["records"] = [str(p) for p in paths]
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("records", nargs="+", type=Path, help="demo records (entropy-probe demo --record)")
    parser.add_argument("--record", type=Path, default=None, help="write the figures and the table here")
    argv = sys.argv[1:] if argv is None else argv
    opts = parser.parse_args(argv)
    data = collect(opts.records)
    text = table(data, opts.record.stem if opts.record else None)
    print(text)
    if opts.record is not None:
        from entropy_probe.records import write_record

        data["table"] = text
        write_record(opts.record, ["python", "examples/demo_functionals_report.py", *argv], data, text)
        print(f"recorded {opts.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
