"""layers.png: the forecast entropy change of every step split by parameter group (``result.by_group``).

One row per group (embeddings, block.0, block.1, ..., head: the probe's default partition), one column
per GRPO step; the colour is ``delta_h1_g = eta Xbar_E^(g) . v^(g)`` in nats, red where the group's
share of the step lowers the entropy. Each column sums to the step's ``delta_h1`` exactly. The right
panel sums every row over the run: which groups drove the entropy change overall.

influence.png: at the step whose truth removed the most entropy, the update prompts that drove it,
``result.update_influence`` (the delete-one-prompt change of the first-order forecast, docs/design.md
section 9), the most negative first.
"""

from __future__ import annotations

from pathlib import Path

GROUP_PREFIX = "group:"
INFLUENCE_KEY = "_update_prompts"  # per step: [(prompt digits, its influence on delta_h1)] of every U prompt
TOP_PROMPTS = 12


def group_columns(rows: list[dict]) -> list[str]:
    """The ``group:<name>`` columns of steps.csv, in the probe's order (embeddings, blocks, head)."""
    return [k for k in rows[0] if k.startswith(GROUP_PREFIX)]


def layer_plot(out: Path, rows: list[dict]) -> Path | None:
    """Heat map of delta_h1 by group and step, and the summed change per group; None without groups."""
    columns = group_columns(rows)
    if not columns:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [c[len(GROUP_PREFIX) :] for c in columns]
    values = np.array([[r[c] for r in rows] for c in columns], dtype=float)  # (groups, steps)
    steps = [r["step"] for r in rows]
    bound = float(np.abs(values).max()) or 1.0
    fig, ax = plt.subplots(
        1,
        2,
        figsize=(13, 0.45 * len(names) + 3),
        constrained_layout=True,
        gridspec_kw=dict(width_ratios=[4, 1]),
    )
    a = ax[0]
    im = a.imshow(
        values,
        aspect="auto",
        cmap="RdBu",
        vmin=-bound,
        vmax=bound,
        interpolation="nearest",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5),
    )
    a.set_yticks(range(len(names)), names)
    a.set(
        xlabel="GRPO step",
        title="Forecast entropy change of each step, by parameter group (delta_h1_g, "
        "nats; columns sum to delta_h1)",
    )
    fig.colorbar(im, ax=a, label="nats (red: lowers entropy)")
    a = ax[1]
    total = values.sum(axis=1)
    a.barh(range(len(names)), total, color=["#d62728" if t < 0 else "#1f77b4" for t in total])
    a.set_yticks(range(len(names)), names)
    a.invert_yaxis()
    a.axvline(0, color="#7f7f7f", lw=0.8)
    a.set(xlabel="summed over the run (nats)", title="Total by group")
    path = out / "layers.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def influence_plot(out: Path, rows: list[dict]) -> Path | None:
    """The U prompts of the step that removed the most entropy (by the truth), ranked by influence."""
    if not rows or INFLUENCE_KEY not in rows[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = min(rows, key=lambda r: r["truth"])
    ranked = sorted(worst[INFLUENCE_KEY], key=lambda pair: pair[1])[:TOP_PROMPTS]
    labels, values = [p for p, _ in ranked], [x for _, x in ranked]
    fig, a = plt.subplots(figsize=(8, 0.35 * len(ranked) + 1.8), constrained_layout=True)
    a.barh(range(len(ranked)), values, color=["#d62728" if x < 0 else "#1f77b4" for x in values])
    a.set_yticks(range(len(ranked)), labels)
    a.invert_yaxis()
    a.axvline(0, color="#7f7f7f", lw=0.8)
    a.set(
        xlabel="influence on the step's forecast delta_h1 (nats; delete-one-prompt change)",
        ylabel="update prompt (digits to sort)",
        title=f"Step {worst['step']} removed the most entropy (truth {worst['truth']:+.3f} nats):\n"
        f"its {len(ranked)} most entropy-removing update prompts",
    )
    path = out / "influence.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
