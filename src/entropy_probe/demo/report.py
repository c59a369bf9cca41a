"""What the demo reports: the summary over steps, ``demo.json`` and ``steps.csv``, the plot, the table."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..statistics import Z95
from .config import DemoConfig


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant or fewer than 2 points."""
    if len(x) < 2:
        return math.nan
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def reliable_rows(rows: list[dict]) -> list[dict]:
    """The steps whose truth is a measurement: ``truth.reliable`` (importance weights' ESS >= 10%)."""
    return [r for r in rows if r["truth_reliable"]]


def summarize(rows: list[dict]) -> dict:
    """The headline figures, all recomputable from the rows of steps.csv.

    Correlations with the truth leave out the steps whose truth the probe flagged unreliable (a step so
    large that a few E sequences carry the importance weight); ``truth_unreliable_steps`` counts them.
    """
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    kept = reliable_rows(rows)
    n = len(rows)
    k = max(1, min(5, n // 4))  # first and last k steps for the reward trend
    forecast_se = math.sqrt(sum(s**2 for s in col("forecast_se")))
    gap = torch.tensor([r["truth"] - r["forecast"] for r in rows], dtype=torch.float64)  # (steps,)
    measured_se = math.sqrt(sum(s**2 for s in col("measured_se")))
    return dict(
        steps=n,
        coverage95=sum(col("truth_inside")) / n,
        coverage95_measured=sum(abs(z) <= Z95 for z in col("measured_z")) / n,
        measured_z_mean=sum(col("measured_z")) / n,
        measured_z_sd=float(torch.tensor(col("measured_z"), dtype=torch.float64).std()) if n > 1 else 0.0,
        correlation=pearson([r["forecast"] for r in kept], [r["truth"] for r in kept]),
        truth_unreliable_steps=n - len(kept),
        correlation_measured=pearson(col("forecast"), col("measured")),
        reward_start=sum(col("reward")[:k]) / k,
        reward_end=sum(col("reward")[-k:]) / k,
        entropy_start=rows[0]["entropy"],
        entropy_end=rows[-1]["entropy_after"],
        sum_forecast=sum(col("forecast")),
        sum_forecast_se=forecast_se,
        sum_truth=sum(col("truth")),
        sum_measured=sum(col("measured")),
        sum_measured_se=measured_se,
        mean_truth_minus_forecast=float(gap.mean()),
        mean_truth_minus_forecast_se=float(gap.std() / math.sqrt(n)) if n > 1 else 0.0,
        max_step_relative_error=max(col("step_relative_error")),
        **second_order_summary(rows),
        **logged_summary(rows),
    )


def second_order_summary(rows: list[dict]) -> dict:
    """The same headline figures for the second-order forecast ``delta_h1 + delta_h2``."""
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    kept = reliable_rows(rows)  # correlations: as in summarize
    n = len(rows)
    gap = torch.tensor([r["truth"] - r["forecast2"] for r in rows], dtype=torch.float64)  # (steps,)
    return dict(
        coverage95_2=sum(col("truth_inside2")) / n,
        correlation2=pearson([r["forecast2"] for r in kept], [r["truth"] for r in kept]),
        sum_forecast2=sum(col("forecast2")),
        sum_forecast2_se=math.sqrt(sum(s**2 for s in col("forecast2_se"))),
        sum_truth_se=math.sqrt(sum(s**2 for s in col("truth_se"))),
        # steps are independent; on each step truth and forecast share E, so their difference has se_diff
        sum_truth_minus_forecast2_se=math.sqrt(sum(s**2 for s in col("truth_se_diff2"))),
        sum_truth_minus_forecast_se=math.sqrt(sum(s**2 for s in col("truth_se_diff"))),
        mean_truth_minus_forecast2=float(gap.mean()),
        mean_truth_minus_forecast2_se=float(gap.std() / math.sqrt(n)) if n > 1 else 0.0,
        **truth_z_summary(kept),
    )


def truth_z_summary(kept: list[dict]) -> dict:
    """Mean and SD over the reliable steps of ``(truth - forecast) / se_diff`` for both orders: about 0 and
    1 when the forecast is unbiased and its paired SE right (docs/demo.md)."""
    out = {}
    for suffix, forecast, se in (("", "forecast", "truth_se_diff"), ("2", "forecast2", "truth_se_diff2")):
        z = torch.tensor([(r["truth"] - r[forecast]) / r[se] for r in kept], dtype=torch.float64)  # (steps,)
        out[f"truth_z{suffix}_mean"] = float(z.mean()) if len(z) else math.nan
        out[f"truth_z{suffix}_sd"] = float(z.std()) if len(z) > 1 else math.nan
    return out


def logged_summary(rows: list[dict]) -> dict:
    """The trainer's logged entropy (on U) against the probe's ``result.entropy`` (on E), per step."""
    if "trainer_entropy" not in rows[0]:
        return {}
    gap = torch.tensor([r["probe_entropy"] - r["trainer_entropy"] for r in rows], dtype=torch.float64)
    n = len(rows)
    return dict(
        logged_entropy_start=rows[0]["trainer_entropy"],
        logged_entropy_end=rows[-1]["trainer_entropy"],
        probe_minus_logged=float(gap.mean()),
        probe_minus_logged_se=float(gap.std() / math.sqrt(n)) if n > 1 else 0.0,
    )


# ---- outputs ---------------------------------------------------------------------------------------
OUTPUT_FILES = ("demo.json", "steps.csv", "demo.png", "entropy.png", "layers.png", "influence.png")


def table_rows(rows: list[dict]) -> list[dict]:
    """The rows without their per-prompt lists (keys starting with "_"): one scalar per column."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


def write_files(out: Path, cfg: DemoConfig, rows: list[dict], summary: dict, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = table_rows(rows)
    with open(out / "steps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    doc = dict(config=asdict(cfg), summary=summary, steps=table, **extra)
    (out / "demo.json").write_text(json.dumps(doc, indent=1))


BLUE, ORANGE, GREEN, GREY, PURPLE = "#1f77b4", "#d62728", "#2ca02c", "#7f7f7f", "#9467bd"


def plot(out: Path, rows: list[dict], summary: dict) -> Path:
    """demo.png: forecast vs truth per step, forecast vs truth scatter, cumulative entropy, reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ("step", "forecast", "forecast_se", "truth", "truth_se", "measured", "forecast2", "forecast2_se")
    keys += ("entropy", "entropy_se", "reward", "reward_se")
    col = {k: np.array([r[k] for r in rows], dtype=float) for k in keys if k in rows[0]}  # (steps,) each
    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    _steps_panel(ax[0, 0], col, summary)
    _scatter_panel(ax[0, 1], col, summary)
    _entropy_panel(ax[1, 0], col, rows)
    _reward_panel(ax[1, 1], col)
    fig.suptitle(
        "entropy-probe demo: GRPO on a tiny transformer, every step forecast before it is taken", fontsize=13
    )
    path = out / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _steps_panel(a, col: dict, summary: dict) -> None:
    """Forecast (both orders), truth and the fresh-sample measurement of every step."""
    step = col["step"]
    a.axhline(0, color=GREY, lw=0.8)
    a.errorbar(
        step - 0.15, col["forecast"], yerr=Z95 * col["forecast_se"], fmt="o", ms=4, color=BLUE, capsize=2,
        label="forecast ± 95%",
    )  # fmt: skip
    a.errorbar(
        step + 0.15,
        col["truth"],
        yerr=Z95 * col["truth_se"],
        fmt="s",
        ms=3.5,
        color=ORANGE,
        capsize=0,
        lw=0.8,
        label="truth (same step, re-measured on E)",
    )
    a.errorbar(
        step,
        col["forecast2"],
        yerr=Z95 * col["forecast2_se"],
        fmt="D",
        ms=3.5,
        color=PURPLE,
        capsize=0,
        lw=0.8,
        label="forecast with 2nd order ± 95%",
    )
    a.plot(step, col["measured"], "x", color=GREEN, ms=5, label="measured on fresh samples")
    a.set(
        xlabel="GRPO step",
        ylabel="entropy change of the step (nats)",
        title="Forecast before each step vs what happened\ntruth inside the 95% interval: "
        f"{summary['coverage95']:.0%} (1st order), {summary['coverage95_2']:.0%} (2nd order) of steps",
    )
    a.legend(fontsize=8, loc="lower right")


def _scatter_panel(a, col: dict, summary: dict) -> None:
    """Forecast against truth, one point per step."""
    import numpy as np

    fc, fc2, tr = col["forecast"], col["forecast2"], col["truth"]
    lim = np.array([min(fc.min(), fc2.min(), tr.min()), max(fc.max(), fc2.max(), tr.max())])
    lim = lim + np.array([-1, 1]) * 0.08 * (lim[1] - lim[0] + 1e-9)
    a.plot(lim, lim, color=GREY, lw=0.8, label="truth = forecast")
    a.errorbar(
        fc,
        tr,
        xerr=Z95 * col["forecast_se"],
        fmt="o",
        ms=4,
        color=BLUE,
        ecolor="#9ecae1",
        capsize=0,
        lw=0.8,
        label="1st order delta_h1 (bars: 95%)",
    )
    a.plot(fc2, tr, "D", ms=3.5, color=PURPLE, label="with 2nd order, delta_h1 + delta_h2")
    a.set(
        xlim=lim,
        ylim=lim,
        xlabel="forecast (nats)",
        ylabel="truth delta_h (nats)",
        title=f"Forecast vs truth, one point per step\ncorrelation {summary['correlation']:.3f} (1st order), "
        f"{summary['correlation2']:.3f} (2nd order)",
    )
    a.set_aspect("equal")
    a.legend(fontsize=8, loc="upper left")


def _entropy_panel(a, col: dict, rows: list[dict]) -> None:
    """The entropy measured on fresh samples against the start plus the summed forecasts and truths."""
    import numpy as np

    fc, fse = col["forecast"], col["forecast_se"]
    h0 = rows[0]["entropy"]
    x = np.concatenate([[0], col["step"]])  # entropy before step 1, then after each step
    measured = np.concatenate([col["entropy"][1:], [rows[-1]["entropy_after"]]])
    cum_fc = h0 + np.concatenate([[0], np.cumsum(fc)])
    cum_band = Z95 * np.sqrt(np.concatenate([[0], np.cumsum(fse**2)]))
    a.fill_between(x, cum_fc - cum_band, cum_fc + cum_band, color=BLUE, alpha=0.2, lw=0)
    a.plot(x, cum_fc, color=BLUE, label="start + summed forecasts (± 95%)")
    a.plot(
        x,
        h0 + np.concatenate([[0], np.cumsum(col["forecast2"])]),
        color=PURPLE,
        label="start + summed 2nd-order forecasts",
    )
    a.plot(
        x,
        h0 + np.concatenate([[0], np.cumsum(col["truth"])]),
        color=ORANGE,
        lw=1,
        label="start + summed truths",
    )
    es = col["entropy_se"]
    a.errorbar(
        x,
        np.concatenate([[h0], measured]),
        yerr=Z95 * np.concatenate([es[:1], es[1:], es[-1:]]),
        fmt="o",
        ms=3,
        color="black",
        capsize=0,
        lw=0.8,
        label="measured entropy, fresh samples",
    )
    a.set(xlabel="GRPO step", ylabel="policy entropy (nats per token)", title="Entropy: measured vs forecast")
    a.legend(fontsize=8)


def _reward_panel(a, col: dict) -> None:
    """The mean reward on fresh samples."""
    step, rw, rse = col["step"], col["reward"], col["reward_se"]
    a.fill_between(step, rw - Z95 * rse, rw + Z95 * rse, color=GREEN, alpha=0.2, lw=0)
    a.plot(step, rw, color=GREEN, marker="o", ms=3, label="mean reward (fresh samples, ± 95%)")
    a.set(
        xlabel="GRPO step",
        ylabel="reward (fraction of answer positions right)",
        title="Reward: sort the prompt's digits",
    )
    a.legend(fontsize=8, loc="lower right")


def print_report(console, rows: list[dict], summary: dict, out: Path) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title="GRPO steps (entropy changes in nats, ± one SE)", box=box.SIMPLE_HEAD, pad_edge=False)
    # 80 columns: the second-order forecast without its SE; reward and coverage in the summary and the plot
    for name in ("step", "entropy", "forecast", "2nd order", "truth", "measured"):
        table.add_column(name, justify="right")
    every = max(1, len(rows) // 20)
    for r in rows:
        if (r["step"] - 1) % every and r is not rows[-1]:
            continue
        table.add_row(
            str(r["step"]),
            f"{r['entropy']:.3f}",
            f"{r['forecast']:+.3f}±{r['forecast_se']:.3f}",
            f"{r['forecast2']:+.3f}",
            f"{r['truth']:+.3f}±{r['truth_se']:.3f}",
            f"{r['measured']:+.3f}±{r['measured_se']:.3f}",
        )
    console.print(table)
    s = summary
    lines = Table(title="Summary", show_header=False)
    lines.add_column(justify="left")
    lines.add_column(justify="right")
    lines.add_row("reward (first -> last steps)", f"{s['reward_start']:.3f} -> {s['reward_end']:.3f}")
    lines.add_row("entropy (start -> end, nats)", f"{s['entropy_start']:.3f} -> {s['entropy_end']:.3f}")
    lines.add_row("truth inside the forecast's 95% interval", f"{s['coverage95']:.0%} of {s['steps']} steps")
    lines.add_row("fresh-sample change within 95% of forecast", f"{s['coverage95_measured']:.0%}")
    lines.add_row(
        "z of fresh-sample change vs forecast: mean, sd",
        f"{s['measured_z_mean']:+.2f}, {s['measured_z_sd']:.2f}",
    )
    if s["truth_unreliable_steps"]:
        lines.add_row(
            "steps with an unreliable truth (ESS < 10%), left out of the correlations",
            str(s["truth_unreliable_steps"]),
        )
    lines.add_row("correlation forecast / truth", f"{s['correlation']:.3f}")
    lines.add_row("correlation forecast / fresh-sample change", f"{s['correlation_measured']:.3f}")
    lines.add_row("correlation 2nd-order forecast / truth", f"{s['correlation2']:.3f}")
    lines.add_row("truth inside the 2nd-order forecast's 95% interval", f"{s['coverage95_2']:.0%}")
    lines.add_row("summed forecasts, 1st order", f"{s['sum_forecast']:+.3f} ± {s['sum_forecast_se']:.3f}")
    lines.add_row(
        "summed forecasts, with 2nd order", f"{s['sum_forecast2']:+.3f} ± {s['sum_forecast2_se']:.3f}"
    )
    lines.add_row(
        "summed truths / fresh-sample changes",
        f"{s['sum_truth']:+.3f} ± {s['sum_truth_se']:.3f} / {s['sum_measured']:+.3f}",
    )
    lines.add_row(
        "summed truth - forecast (paired SE): 1st, 2nd order",
        f"{s['sum_truth'] - s['sum_forecast']:+.3f} ± {s['sum_truth_minus_forecast_se']:.3f}, "
        f"{s['sum_truth'] - s['sum_forecast2']:+.3f} ± {s['sum_truth_minus_forecast2_se']:.3f}",
    )
    lines.add_row(
        "mean truth - forecast per step",
        f"{s['mean_truth_minus_forecast']:+.4f} ± {s['mean_truth_minus_forecast_se']:.4f}",
    )
    lines.add_row(
        "SD of z, truth vs forecast: 1st, 2nd order",
        f"{s['truth_z_sd']:.2f}, {s['truth_z2_sd']:.2f}",
    )
    if "probe_minus_logged" in s:
        lines.add_row(
            "probe's entropy - trainer's logged, per step",
            f"{s['probe_minus_logged']:+.4f} ± {s['probe_minus_logged_se']:.4f}",
        )
    lines.add_row("real AdamW step vs forecast's step (rel. error)", f"{s['max_step_relative_error']:.1e}")
    console.print(lines)
    console.print("wrote " + ", ".join(str(out / n) for n in OUTPUT_FILES))
