"""``entropy-probe demo-guard``: the demo's GRPO run twice from the same seed, unguarded and guarded.

    make demo-guard                                   # entropy-probe demo-guard --out runs/demo_guard
    entropy-probe demo-guard --entropy-budget 0.02    # any ``entropy-probe demo`` option works here too

Both runs are ``entropy-probe demo`` with the same options and seed; the second has ``--entropy-budget``
(default ``DEFAULT_BUDGET``): before each AdamW step ``EntropyGuard(budget).decide(result)`` shrinks the
learning rate of that one step so that the forecast entropy drop, at its 95% lower bound, stays within
the budget (docs/guard.md). Writes ``unguarded/`` and ``guarded/`` (each a full demo output),
``demo_guard.json`` (the comparison) and ``demo_guard.png`` (entropy, reward and the guard's scale per
step) to ``--out``. docs/demo.md reports a run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import DemoConfig, parse_args

DEFAULT_BUDGET = 0.02  # nats per step; binds on about half the steps of the default demo (docs/demo.md)
OUT = "runs/demo_guard"


def run_pair(cfg: DemoConfig, console=None) -> dict:
    """The unguarded and the guarded run (``cfg.entropy_budget``), same seed; returns demo_guard.json."""
    from .train import run

    out = Path(cfg.out)
    docs = {}
    for name, budget in (("unguarded", None), ("guarded", cfg.entropy_budget)):
        docs[name] = run(replace(cfg, entropy_budget=budget, out=str(out / name)), console)
    comparison = dict(
        entropy_budget=cfg.entropy_budget,
        seed=cfg.seed,
        steps=cfg.steps,
        **{name: run_summary(doc, cfg.entropy_budget) for name, doc in docs.items()},
    )
    (out / "demo_guard.json").write_text(json.dumps(comparison, indent=1))
    plot_pair(out / "demo_guard.png", docs, cfg.entropy_budget)
    return comparison


def run_summary(doc: dict, budget: float) -> dict:
    """The figures docs/demo.md reports for one run, from its demo.json."""
    rows, s = doc["steps"], doc["summary"]
    entropy = [r["entropy"] for r in rows] + [rows[-1]["entropy_after"]]  # before each step, after the last
    measured = np.array([r["measured"] for r in rows])
    out = {k: s[k] for k in ("entropy_start", "entropy_end", "reward_start", "reward_end", "sum_measured")}
    out.update(
        entropy_min=min(entropy),
        steps_measured_drop_over_budget=int((measured < -budget).sum()),
        runtime_s=doc["runtime_s"],
    )
    if "guard_scale" in rows[0]:
        scale = np.array([r["guard_scale"] for r in rows])
        out.update(
            fraction_scaled=float(np.mean([r["guard_reason"] == "scaled" for r in rows])),
            mean_scale=float(scale.mean()),
            min_scale=float(scale.min()),
        )
    return out


def plot_pair(path: Path, docs: dict, budget: float) -> Path:
    """Entropy (fresh samples) and reward of both runs per step, and the guard's scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"unguarded": "#7f7f7f", "guarded": "#1f77b4"}
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for name, doc in docs.items():
        rows = doc["steps"]
        step = np.array([r["step"] for r in rows])
        h = np.array([r["entropy"] for r in rows] + [rows[-1]["entropy_after"]])
        hse = np.array([r["entropy_se"] for r in rows] + [rows[-1]["entropy_se"]])
        x = np.concatenate([[0], step])
        ax[0].fill_between(x, h - 1.96 * hse, h + 1.96 * hse, color=colors[name], alpha=0.15, lw=0)
        ax[0].plot(x, h, color=colors[name], marker="o", ms=3, label=name)
        rw, rse = np.array([r["reward"] for r in rows]), np.array([r["reward_se"] for r in rows])
        ax[1].fill_between(step, rw - 1.96 * rse, rw + 1.96 * rse, color=colors[name], alpha=0.15, lw=0)
        ax[1].plot(step, rw, color=colors[name], marker="o", ms=3, label=name)
        if "guard_scale" in rows[0]:
            ax[2].bar(step, [r["guard_scale"] for r in rows], color=colors[name], width=0.8)
    ax[0].set(
        xlabel="GRPO step",
        ylabel="entropy (nats per token, fresh samples)",
        title="Entropy before each step (± 95%)",
    )
    ax[1].set(xlabel="GRPO step", ylabel="mean reward (fresh samples)", title="Reward (± 95%)")
    ax[2].set(
        xlabel="GRPO step",
        ylabel="learning-rate scale",
        ylim=(0, 1.05),
        title=f"Guard: scale of each step (budget {budget:g} nats at 95%)",
    )
    for a in ax[:2]:
        a.legend(fontsize=8)
    fig.suptitle("GRPO from the same seed: unguarded vs EntropyGuard", fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_comparison(console, comparison: dict) -> None:
    from rich.table import Table

    table = Table(
        title=f"Unguarded vs guarded (budget {comparison['entropy_budget']:g} nats per step, "
        f"seed {comparison['seed']}, {comparison['steps']} steps)"
    )
    table.add_column("")
    for name in ("unguarded", "guarded"):
        table.add_column(name, justify="right")
    u, g = comparison["unguarded"], comparison["guarded"]
    rows = [
        ("entropy start -> end (nats)", "{entropy_start:.3f} -> {entropy_end:.3f}"),
        ("minimum entropy", "{entropy_min:.3f}"),
        ("reward first -> last steps", "{reward_start:.3f} -> {reward_end:.3f}"),
        ("summed measured changes (nats)", "{sum_measured:+.3f}"),
        ("steps whose measured drop > budget", "{steps_measured_drop_over_budget}"),
        ("wall time (s)", "{runtime_s:.0f}"),
    ]
    for label, fmt in rows:
        table.add_row(label, fmt.format(**u), fmt.format(**g))
    table.add_row("steps scaled / mean scale", "-", f"{g['fraction_scaled']:.0%} / {g['mean_scale']:.2f}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    cfg = parse_args(argv)
    if cfg.entropy_budget is None:
        cfg = replace(cfg, entropy_budget=DEFAULT_BUDGET)
    if cfg.out == DemoConfig.out:  # no --out given: not the plain demo's folder
        cfg = replace(cfg, out=OUT)
    console = Console()
    comparison = run_pair(cfg, console)
    print_comparison(console, comparison)
    console.print(f"wrote {Path(cfg.out) / 'demo_guard.json'} and {Path(cfg.out) / 'demo_guard.png'}")
    return 0
