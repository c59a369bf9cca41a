"""The three PNG plots of ``entropy-probe validate`` (matplotlib, Agg backend: no display needed).

- calibration.png: the K shard intervals around the exact value, the standardised errors against
  N(0, 1), the variance ratio and the coverage with their acceptance intervals;
- se_scaling.png: SE against the scale factor c of B_E on log-log axes, with the c^(-1/2) line;
- truth_vs_prediction.png: the entropy change against the step fraction alpha (exact, weighted truth,
  first-order prediction) and the ratio truth / prediction tending to 1.

Called by ``validate.main``; docs/validation.md says how to read each panel.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..statistics import Z95

PASS_COLOUR, FAIL_COLOUR = "tab:green", "tab:red"


def _verdict(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def calibration_plot(path: Path, shards: dict, exact: dict, checks: dict, shard_units: int) -> None:
    """2 x 2 panels; ``shards[w]`` holds delta_h1 and se per shard for weighting w."""
    fig, ax = plt.subplots(2, 2, figsize=(13, 9.5))
    weightings = list(shards)
    _shard_intervals_panel(ax[0, 0], shards, exact, checks)
    _standardised_errors_panel(ax[0, 1], shards, exact)
    # (c) variance ratio with its chi-square interval; (d) coverage with its Wilson interval.
    for panel, key, value, target, ylabel, title in (
        (
            ax[1, 0],
            "variance ratio",
            "ratio",
            1.0,
            "empirical Var(delta_h1) / mean predicted Var_E",
            "(c) variance over shards vs predicted (chi-square interval)",
        ),
        (
            ax[1, 1],
            "coverage",
            "coverage",
            0.95,
            "share of 95% intervals covering the exact value",
            "(d) coverage of the 95% intervals (Wilson interval)",
        ),
    ):
        for j, w in enumerate(weightings):
            _check_marker(panel, j, checks[f"{key} ({w})"], key, value, shard_units)
        panel.axhline(
            target, color="black", ls="--", lw=1, label="nominal 0.95" if key == "coverage" else "target 1"
        )
        panel.set_xticks(range(len(weightings)), [f"weighting: {w}" for w in weightings])
        panel.set_xlim(-0.6, len(weightings) - 0.4)
        panel.set(title=title, ylabel=ylabel)
        panel.legend(fontsize=8, loc="lower center")
    fig.suptitle("Calibration over E with U fixed (DESIGN section 8, checks 1 and 4)", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shard_intervals_panel(a, shards: dict, exact: dict, checks: dict) -> None:
    """(a) every shard's 95% interval of the first weighting, sorted by delta_h1; misses in red."""
    main = list(shards)[0]
    d, se, x0 = shards[main]["delta_h1"], shards[main]["se"], exact[main]
    order = sorted(range(len(d)), key=lambda i: d[i])
    for rank, i in enumerate(order):
        miss = abs(d[i] - x0) > Z95 * se[i]
        a.plot(
            [rank, rank], [d[i] - Z95 * se[i], d[i] + Z95 * se[i]], color="tab:red" if miss else "0.6", lw=1
        )
    a.scatter(
        range(len(d)), [d[i] for i in order], s=6, color="tab:blue", zorder=3, label="delta_h1 of a shard"
    )
    a.axhline(x0, color="black", lw=1.5, label=f"exact eta grad H . v = {x0:.3g}")
    a.plot([], [], color="0.6", label="95% interval covering the exact value")
    a.plot([], [], color="tab:red", label="95% interval missing it")
    cov = checks[f"coverage ({main})"]["figures"]
    a.set(
        title=f"(a) {len(d)} independent E shards, {main}: coverage {cov['coverage']:.3f}",
        xlabel="shard (sorted by delta_h1)",
        ylabel="predicted entropy change delta_h1 (nats)",
    )
    a.legend(loc="upper left", fontsize=8)


def _standardised_errors_panel(b, shards: dict, exact: dict) -> None:
    """(b) standardised errors against N(0, 1)."""
    for w, colour in zip(list(shards), ("tab:blue", "tab:orange")):
        z = [(di - exact[w]) / si for di, si in zip(shards[w]["delta_h1"], shards[w]["se"]) if si > 0]
        b.hist(z, bins=25, range=(-5, 5), density=True, histtype="step", lw=1.8, color=colour, label=f"{w}")
    grid = [-5 + j / 10 for j in range(101)]
    b.plot(
        grid,
        [math.exp(-g * g / 2) / math.sqrt(2 * math.pi) for g in grid],
        color="black",
        lw=1.2,
        ls="--",
        label="N(0, 1)",
    )
    b.set(
        title="(b) standardised errors: calibrated SEs give N(0, 1)",
        xlabel="(delta_h1 - exact) / SE_E  (dimensionless)",
        ylabel="density",
    )
    b.legend(fontsize=8)


def _check_marker(panel, j: int, c: dict, key: str, value: str, shard_units: int) -> None:
    """Weighting j's measured figure of check ``c`` with its interval, coloured by the verdict."""
    f = c["figures"]
    if key == "coverage":  # the Wilson interval is around the observed share; the expected one must be inside
        lo, hi = f["wilson"]
        label = "observed share and its Wilson interval"
        panel.plot(
            [j - 0.25, j + 0.25],
            [f["expected"]] * 2,
            color="black",
            lw=2.5,
            label=f"expected at B_E = {shard_units} (skewed s_n)" if j == 0 else None,
        )
    else:  # the chi-square interval is where a calibrated ratio falls
        lo, hi = f["interval"]
        label = "measured ratio; bar = acceptance interval"
    colour = PASS_COLOUR if c["passed"] else FAIL_COLOUR
    panel.errorbar(
        [j],
        [f[value]],
        yerr=[[f[value] - lo], [hi - f[value]]] if key == "coverage" else None,
        fmt="o",
        color=colour,
        capsize=6,
        ms=8,
        label=label if j == 0 else None,
    )
    if key != "coverage":
        panel.plot([j, j], [lo, hi], color=colour, lw=6, alpha=0.3)
    panel.annotate(
        f"{f[value]:.3f} ({_verdict(c['passed'])})",
        (j, f[value]),
        xytext=(14, 7),
        textcoords="offset points",
        va="center",
        fontsize=9,
    )


def se_scaling_plot(
    path: Path, factors: list[int], base_units: int, var_by_factor: list[list[float]], check: dict
) -> None:
    """log-log SE against c, every replicate, the pooled SE per c and the fitted and reference lines."""
    f = check["figures"]
    fig, a = plt.subplots(figsize=(7.5, 5.5))
    for c, vars_c in zip(factors, var_by_factor):
        a.scatter(
            [c] * len(vars_c),
            [math.sqrt(v) for v in vars_c],
            s=10,
            color="0.65",
            alpha=0.7,
            label="SE_E of one shard" if c == factors[0] else None,
        )
    se, se_log = f["se"], f["se_of_log_se"]
    yerr = [
        [s - s * math.exp(-Z95 * e) for s, e in zip(se, se_log)],
        [s * math.exp(Z95 * e) - s for s, e in zip(se, se_log)],
    ]
    a.errorbar(
        factors,
        se,
        yerr=yerr,
        fmt="o",
        color="tab:blue",
        capsize=5,
        ms=7,
        label="sqrt(mean Var_E) per c, 95% error bar",
    )
    fit = [math.exp(f["intercept"]) * c ** f["slope"] for c in factors]
    a.plot(
        factors, fit, color="tab:blue", lw=1.5, label=f"fit: slope {f['slope']:+.3f} +- {f['se_slope']:.3f}"
    )
    a.plot(
        factors,
        [se[0] * c**-0.5 for c in factors],
        color="black",
        ls="--",
        lw=1.2,
        label="reference c^(-1/2) through c = 1",
    )
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xticks(factors, [f"{c}\n(B_E = {c * base_units})" for c in factors])
    a.set(
        xlabel="scale factor c of the evaluation batch (B_E in units)",
        ylabel="SE_E of delta_h1 (nats)",
        title=f"SE scaling with B_E: slope {f['slope']:+.3f}, expected -0.5 ({_verdict(check['passed'])})",
    )
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def truth_plot(path: Path, data: dict, lr: float, eval_units: int) -> None:
    """Entropy change against alpha, and the ratio truth / prediction against alpha."""
    al = data["alphas"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5.5))
    a.plot(
        data["grid"], data["curve"], color="black", lw=1.8, label="exact H(theta + alpha eta v) - H(theta)"
    )
    a.plot(
        data["grid"],
        [g * data["exact_tangent"] for g in data["grid"]],
        color="black",
        ls=":",
        lw=1.2,
        label="exact tangent alpha eta grad H . v",
    )
    pred = [g * data["delta_h1"] for g in data["grid"]]
    band = [g * Z95 * data["se_cond_e"] for g in data["grid"]]
    a.plot(data["grid"], pred, color="tab:blue", lw=1.5, label="prediction alpha * delta_h1")
    a.fill_between(
        data["grid"],
        [p - w for p, w in zip(pred, band)],
        [p + w for p, w in zip(pred, band)],
        color="tab:blue",
        alpha=0.15,
        label="prediction +- 1.96 alpha SE_E",
    )
    a.errorbar(
        al,
        data["truth"],
        yerr=[Z95 * s for s in data["truth_se"]],
        fmt="s",
        color="tab:orange",
        capsize=4,
        label="truth (importance weights on E) +- 1.96 SE",
    )
    a.axhline(0, color="0.8", lw=0.8)
    a.set(
        xlabel="step fraction alpha (theta' = theta + alpha eta v)",
        ylabel="entropy change (nats)",
        title=f"Entropy change along the step (eta = {lr:.3g}, B_E = {eval_units} units)",
    )
    a.legend(fontsize=8)
    b.axhline(1.0, color="black", ls="--", lw=1, label="1 (first order exact)")
    b.plot(data["fine"], data["fine_ratio"], "o-", color="black", label="exact change / exact tangent")
    b.errorbar(
        al,
        data["ratio"],
        yerr=[Z95 * s for s in data["ratio_se"]],
        fmt="s-",
        color="tab:orange",
        capsize=4,
        label="truth / (alpha delta_h1), same E, +- 1.96 se_diff",
    )
    b.set_xscale("log", base=2)
    b.set_xticks(data["fine"], [f"1/{round(1 / x)}" if x < 1 else f"{x:g}" for x in data["fine"]])
    b.set(
        xlabel="step fraction alpha (log scale)",
        ylabel="ratio (dimensionless)",
        title="Truth / prediction -> 1 as alpha -> 0",
    )
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
