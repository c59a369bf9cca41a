"""docs/control.md's table and picture from recorded runs of examples/trl_entropy_control.py.

    python examples/entropy_control_report.py docs/records/entropy_control_seed*.json --png docs/control.png

Prints, per method and seed, the figures the issue asks for (from TRL's logged entropy and reward):
tracking error ``|H - target|`` averaged from the first step at or below the target on, the minimum
entropy after step 10, the mean reward of the last 10 steps and the wall time; then their mean over seeds.
The picture: entropy and reward per step of every method, one column per seed. ``--merge A B OUT``
adds the controller runs of record B (``--control-entropy trainer``) to record A as
``controller-*-trainer`` and writes OUT.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHODS = (
    "none",
    "adaptive",
    "guard",
    "controller-scale",
    "controller-steer",
    "controller-scale-trainer",  # --control-entropy trainer, merged into the seed's record
    "controller-steer-trainer",
)
COLORS = ("#7f7f7f", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#17becf", "#e377c2")


def figures(run: dict, target: float) -> dict:
    h, r = run["entropy"], run["reward"]
    reached = next((i for i, x in enumerate(h) if x <= target), None)
    return {
        "tracking": None if reached is None else sum(abs(x - target) for x in h[reached:]) / len(h[reached:]),
        "min_after_10": min(h[10:]),
        "reward_last_10": sum(r[-10:]) / 10,
        "wall_s": run["wall_s"],
    }


def table(docs: list[dict]) -> str:
    rows = ["| method | seed | tracking error | min entropy after step 10 | reward, last 10 | wall (s) |"]
    rows.append("|---|---|---|---|---|---|")
    for method in METHODS:
        per_seed = []
        for doc in docs:
            if method not in doc["runs"]:
                continue
            f = figures(doc["runs"][method], doc["options"]["entropy_target"])
            per_seed.append(f)
            track = "not reached" if f["tracking"] is None else f"{f['tracking']:.3f}"
            rows.append(
                f"| {method} | {doc['options']['seed']} | {track} | {f['min_after_10']:.3f} | "
                f"{f['reward_last_10']:.3f} | {f['wall_s']:.0f} |"
            )
        if per_seed:
            n = len(per_seed)
            tracks = [f["tracking"] for f in per_seed if f["tracking"] is not None]
            track = f"{sum(tracks) / len(tracks):.3f}" if tracks else "not reached"
            mean = {k: sum(f[k] for f in per_seed) / n for k in ("min_after_10", "reward_last_10", "wall_s")}
            rows.append(
                f"| **{method}** | mean of {n} | {track} | {mean['min_after_10']:.3f} | "
                f"{mean['reward_last_10']:.3f} | {mean['wall_s']:.0f} |"
            )
    return "\n".join(rows)


def plot(docs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(
        2, len(docs), figsize=(4.6 * len(docs), 6.4), constrained_layout=True, squeeze=False
    )
    for j, doc in enumerate(docs):
        target, band = doc["options"]["entropy_target"], doc["options"].get("band", 0.1)
        for method, color in zip(METHODS, COLORS):
            if method in doc["runs"]:
                run = doc["runs"][method]
                steps = range(1, len(run["entropy"]) + 1)
                ax[0, j].plot(steps, run["entropy"], color=color, lw=1.2, label=method)
                ax[1, j].plot(steps, run["reward"], color=color, lw=1.2, label=method)
        ax[0, j].axhline(target, color="k", lw=0.6, ls="--")
        ax[0, j].axhspan(target - band, target + band, color="k", alpha=0.07)
        ax[0, j].set(title=f"seed {doc['options']['seed']}", ylabel="entropy (TRL's log, nats)")
        ax[1, j].set(xlabel="optimizer step", ylabel="mean reward of the step's batch")
    ax[0, 0].legend(fontsize=7)
    fig.suptitle("TRL GRPOTrainer: entropy control head to head (target -+ band shaded)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("records", nargs="+")
    parser.add_argument("--png", default=None)
    parser.add_argument("--merge", nargs=3, metavar=("A", "B", "OUT"), default=None)
    opts = parser.parse_args(argv)
    if opts.merge:
        a, b, out = (Path(p) for p in opts.merge)
        doc, extra = json.loads(a.read_text()), json.loads(b.read_text())
        for name, run in extra["runs"].items():
            doc["runs"][f"{name}-trainer"] = run
        doc["options_trainer_entropy"] = extra["options"]
        out.write_text(json.dumps(doc, indent=1))
    docs = sorted((json.loads(Path(p).read_text()) for p in opts.records), key=lambda d: d["options"]["seed"])
    print(table(docs))
    if opts.png:
        plot(docs, Path(opts.png))


if __name__ == "__main__":
    main()
