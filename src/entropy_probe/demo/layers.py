"""layers.png: the forecast entropy change of every step split by parameter group (``result.by_group``).

One row per group (embeddings, block.0, block.1, ..., head: the probe's default partition), one column
per GRPO step; the colour is ``delta_h1_g = eta Xbar_E^(g) . v^(g)`` in nats, red where the group's
share of the step lowers the entropy. Each column sums to the step's ``delta_h1`` exactly. The right
panel sums every row over the run: which groups drove the entropy change overall.
"""

from __future__ import annotations

from pathlib import Path

GROUP_PREFIX = "group:"


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
