"""entropy.png: the probe's entropy next to the entropy the demo's trainer would log, every step.

Before each step: the trainer's logged ``entropy`` (TRL's formula ``sum(m H_t) / sum(m)`` on the update
batch U it trains on), the probe's ``result.entropy`` on its evaluation batch E, and the entropy of the
run's functional on the fresh samples F. With ``--entropy token`` all three estimate the same number and
differ by sampling noise; with ``--entropy sequence`` the probe's and F's are the per-response mean
surprisal, which sits apart from the logged number (docs/token_entropy.md).
"""

from __future__ import annotations

from pathlib import Path

from ..statistics import Z95

GREEN, BLUE, BLACK, GREY = "#2ca02c", "#1f77b4", "black", "#7f7f7f"


def entropy_plot(out: Path, rows: list[dict], summary: dict, functional: str) -> Path:
    """Left: the three entropies per step; right: probe minus logged per step, with its mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ("step", "trainer_entropy", "probe_entropy", "entropy", "entropy_se")
    col = {k: np.array([r[k] for r in rows], dtype=float) for k in keys}  # (steps,) each
    before = col["step"] - 1  # every entropy here is measured before the step
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    a = ax[0]
    a.plot(before, col["trainer_entropy"], color=GREEN, lw=1.5, label="trainer's logged entropy (U)")
    a.plot(before, col["probe_entropy"], color=BLUE, lw=1.2, ls="--", label="probe's result.entropy (E)")
    a.errorbar(
        before, col["entropy"], yerr=Z95 * col["entropy_se"], fmt="o", ms=2.5, color=BLACK, lw=0.7,
        label=f"fresh samples F, {functional} functional (± 95%)",
    )  # fmt: skip
    a.set(xlabel="GRPO step (entropy before it)", ylabel="entropy (nats per token)")
    a.set_title(f"What a dashboard shows vs what the probe forecasts (entropy={functional!r})")
    a.legend(fontsize=8)
    b = ax[1]
    gap = col["probe_entropy"] - col["trainer_entropy"]
    b.axhline(0, color=GREY, lw=0.8)
    b.plot(before, gap, "o-", ms=3, lw=0.8, color=BLUE)
    m, se = summary["probe_minus_logged"], summary["probe_minus_logged_se"]
    b.axhline(m, color=BLUE, lw=1, ls=":", label=f"mean {m:+.4f} ± {se:.4f} (SE over steps)")
    b.set(
        xlabel="GRPO step",
        ylabel="probe's entropy - logged entropy (nats)",
        title="Probe (on E) minus trainer's log (on U), same parameters",
    )
    b.legend(fontsize=8)
    path = out / "entropy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
