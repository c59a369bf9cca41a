"""``entropy-probe demo``: GRPO fine-tuning of a tiny transformer, the probe forecasting every step.

Run it with ``make demo`` (sets up .venv first), ``entropy-probe demo --out runs/demo`` or
``PYTHONPATH=src python -m entropy_probe demo --help``. About a minute on 2 CPU cores.

What happens:
1. A small GPT-2 (or Llama) is built from a config (random init, nothing downloaded) and warmed up
   with a few supervised steps on the sorting task (``sorting_task.py``), so RL has a start.
2. GRPO with AdamW, for ``--steps`` steps. At every step:
   - sample an update batch U (trained on) and an independent evaluation batch E (probe only);
   - measure the entropy on fresh samples F (``H_before``);
   - run the probe on the step AdamW is about to take (``direction="optimizer-step"``): the forecast
     ``delta_h1`` with its SE over E, the unconditional SE and the truth (the same step applied
     functionally, entropy re-measured on E by importance weighting, DESIGN section 6);
   - take the real AdamW step with the same loss the probe differentiates;
   - measure the entropy again on fresh samples drawn with the same seed and prompts as F
     (``H_after``; common random numbers make the paired difference precise): the measured change.
3. A table, the coverage of the forecast's 95% intervals, the correlation of forecast and truth,
   plots, ``demo.json`` and ``steps.csv`` in ``--out``. docs/demo.md explains every number.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .batch import RolloutBatch
from .config import ProbeConfig
from .logprobs import sequence_logprobs
from .loss import policy_loss
from .objectives import unit_entropy
from .probe import EntropyProbe
from .sampling import sample_rollouts
from .sorting_task import SortingTask

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass
class DemoConfig:
    """Every option of the demo (the command line mirrors these fields)."""

    steps: int = 40
    seed: int = 0
    arch: str = "gpt2"
    layers: int = 2
    width: int = 64
    heads: int = 4
    n_digits: int = 6
    update_prompts: int = 16
    eval_prompts: int = 48
    measure_prompts: int = 128
    group_size: int = 8
    lr: float = 2e-3
    warmup_steps: int = 30
    warmup_lr: float = 3e-3
    warmup_batch: int = 64
    max_grad_norm: float = 1.0
    device: str = "cpu"
    threads: int = 1
    out: str = "runs/demo"


# ---- model and losses ---------------------------------------------------------------------------
def build_model(cfg: DemoConfig, task: SortingTask) -> nn.Module:
    """A causal LM from a Hugging Face config, random init (seeded by the caller), no dropout.

    No dropout, so train and eval mode compute the same function: the step the probe forecasts
    (evaluated in eval mode) is the step training takes.
    """
    positions = task.max_len + 1 + task.max_new_tokens
    if cfg.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(vocab_size=task.vocab_size, n_positions=positions, n_embd=cfg.width, n_layer=cfg.layers,
                            n_head=cfg.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=None, eos_token_id=task.eos, pad_token_id=task.eos)
        return GPT2LMHeadModel(config)
    if cfg.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=task.vocab_size, hidden_size=cfg.width, intermediate_size=2 * cfg.width,
                             num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                             num_key_value_heads=cfg.heads, max_position_embeddings=positions,
                             bos_token_id=None, eos_token_id=task.eos, pad_token_id=task.eos)
        return LlamaForCausalLM(config)
    raise ValueError(f"demo --arch must be 'gpt2' or 'llama', got {cfg.arch!r}")


def supervised_warmup(model: nn.Module, optimizer: torch.optim.Optimizer, task: SortingTask, cfg: DemoConfig,
                      gen: torch.Generator, on_step=None) -> float:
    """A few steps of teacher-forced cross-entropy on correct answers; returns the last loss."""
    loss = torch.tensor(math.nan)
    model.train()
    for _ in range(cfg.warmup_steps):
        batch = task.supervised_batch(cfg.warmup_batch, gen).to(cfg.device)
        loss = -sequence_logprobs(model, batch, 1.0, "token-mean").weighted.mean()  # mean token NLL
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_step is not None:
            on_step(float(loss.detach()))
    return float(loss.detach())


# ---- one RL step -----------------------------------------------------------------------------------
def _seed(cfg: DemoConfig, step: int, role: int) -> int:
    """A distinct, reproducible seed for each (run seed, step, role)."""
    return (cfg.seed * 1_000_003 + step * 16 + role) % (2 ** 63)


def fresh_entropy(model: nn.Module, task: SortingTask, prompts, cfg: DemoConfig, seed: int,
                  probe_cfg: ProbeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-unit entropy, per-unit mean reward)``, each ``(B_F,)`` float64, on fresh samples."""
    batch = sample_rollouts(model, prompts, cfg.group_size, task.max_new_tokens, task.eos, task.reward,
                            probe_cfg.temperature, seed)
    with torch.no_grad():
        weighted = sequence_logprobs(model, batch, probe_cfg.temperature, probe_cfg.entropy_weighting).weighted
    h = unit_entropy(weighted, batch).double().cpu()
    g = batch.unit_sizes.double().cpu()
    r = torch.zeros(batch.n_units, dtype=torch.float64).index_add_(0, batch.unit_index.cpu(),
                                                                  batch.rewards.double().cpu()) / g
    return h, r


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std() / math.sqrt(x.numel()))


def rl_step(step: int, model, optimizer, probe: EntropyProbe, task: SortingTask, cfg: DemoConfig,
            prompt_gen: torch.Generator) -> dict:
    """Sample U, E and F; forecast; step; measure. Returns one row of steps.csv."""
    pc = probe.config

    def sample(prompts, seed: int) -> RolloutBatch:
        return sample_rollouts(model, prompts, cfg.group_size, task.max_new_tokens, task.eos, task.reward,
                               pc.temperature, seed)

    u_batch = sample(task.prompts(cfg.update_prompts, prompt_gen), _seed(cfg, step, 0))
    e_batch = sample(task.prompts(cfg.eval_prompts, prompt_gen), _seed(cfg, step, 1))
    f_prompts = task.prompts(cfg.measure_prompts, prompt_gen)
    h_before, r_before = fresh_entropy(model, task, f_prompts, cfg, _seed(cfg, step, 2), pc)

    result = probe.run(u_batch, e_batch, truth=True)
    v = probe.update_direction(u_batch)  # to check that the real step is the forecast's step
    theta = {name: p.detach().clone() for name, p in probe.parameters().items()}

    model.train()
    optimizer.zero_grad(set_to_none=True)
    policy_loss(model, u_batch, pc).backward()
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    optimizer.step()

    with torch.no_grad():
        # ||theta_after - theta - eta v|| / ||eta v||: float noise only (Adam rescales the round-off
        # of gradients that are analytically zero, e.g. GPT-2's key biases, into small steps).
        moved = {n: p.detach() - theta[n] for n, p in probe.parameters().items()}
        step_error = math.sqrt(sum(float((moved[n] - result.lr * v[n]).square().sum()) for n in moved))
        step_size = math.sqrt(sum(float((result.lr * v[n]).square().sum()) for n in moved))
    h_after, _ = fresh_entropy(model, task, f_prompts, cfg, _seed(cfg, step, 2), pc)  # same seed and prompts

    reward, reward_se = _mean_se(r_before)
    entropy, entropy_se = _mean_se(h_before)
    measured, measured_se = _mean_se(h_after - h_before)  # paired by unit
    t = result.truth
    lo, hi = result.interval(Z95)
    return dict(
        step=step + 1, reward=reward, reward_se=reward_se, reward_update=float(u_batch.rewards.mean()),
        entropy=entropy, entropy_se=entropy_se, entropy_after=float(h_after.mean()),
        forecast=result.delta_h1, forecast_se=result.se_cond_e, forecast_se_jackknife=result.se_jackknife,
        forecast_se_total=result.se_total, forecast_lo95=lo, forecast_hi95=hi,
        truth=t.delta_h, truth_se=t.se, truth_ess=t.ess, truth_se_diff=t.se_diff,
        truth_inside=int(lo <= t.delta_h <= hi),
        measured=measured, measured_se=measured_se,
        measured_z=(measured - result.delta_h1) / math.sqrt(result.se_cond_e ** 2 + measured_se ** 2),
        step_relative_error=step_error / step_size if step_size > 0 else 0.0,
    )


# ---- summary ---------------------------------------------------------------------------------------
def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation; NaN when either side is constant or fewer than 2 points."""
    if len(x) < 2:
        return math.nan
    a, b = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def summarize(rows: list[dict]) -> dict:
    """The headline figures, all recomputable from the rows of steps.csv."""
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    n = len(rows)
    k = max(1, min(5, n // 4))  # first and last k steps for the reward trend
    forecast_se = math.sqrt(sum(s ** 2 for s in col("forecast_se")))
    gap = torch.tensor([r["truth"] - r["forecast"] for r in rows], dtype=torch.float64)  # (steps,)
    measured_se = math.sqrt(sum(s ** 2 for s in col("measured_se")))
    return dict(
        steps=n,
        coverage95=sum(col("truth_inside")) / n,
        coverage95_measured=sum(abs(z) <= Z95 for z in col("measured_z")) / n,
        measured_z_mean=sum(col("measured_z")) / n,
        measured_z_sd=float(torch.tensor(col("measured_z"), dtype=torch.float64).std()) if n > 1 else 0.0,
        correlation=pearson(col("forecast"), col("truth")),
        correlation_measured=pearson(col("forecast"), col("measured")),
        reward_start=sum(col("reward")[:k]) / k, reward_end=sum(col("reward")[-k:]) / k,
        entropy_start=rows[0]["entropy"], entropy_end=rows[-1]["entropy_after"],
        sum_forecast=sum(col("forecast")), sum_forecast_se=forecast_se,
        sum_truth=sum(col("truth")), sum_measured=sum(col("measured")), sum_measured_se=measured_se,
        mean_truth_minus_forecast=float(gap.mean()),
        mean_truth_minus_forecast_se=float(gap.std() / math.sqrt(n)) if n > 1 else 0.0,
        max_step_relative_error=max(col("step_relative_error")),
    )


# ---- outputs ---------------------------------------------------------------------------------------
def write_files(out: Path, cfg: DemoConfig, rows: list[dict], summary: dict, extra: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "steps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    doc = dict(config=asdict(cfg), summary=summary, steps=rows, **extra)
    (out / "demo.json").write_text(json.dumps(doc, indent=1))


def plot(out: Path, rows: list[dict], summary: dict) -> Path:
    """demo.png: forecast vs truth per step, forecast vs truth scatter, cumulative entropy, reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    col = lambda k: np.array([r[k] for r in rows], dtype=float)  # noqa: E731
    step = col("step")
    fc, fse, tr, tse = col("forecast"), col("forecast_se"), col("truth"), col("truth_se")
    ms, mse = col("measured"), col("measured_se")
    blue, orange, green, grey = "#1f77b4", "#d62728", "#2ca02c", "#7f7f7f"

    fig, ax = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    a = ax[0, 0]
    a.axhline(0, color=grey, lw=0.8)
    a.errorbar(step - 0.15, fc, yerr=Z95 * fse, fmt="o", ms=4, color=blue, capsize=2, label="forecast ± 95%")
    a.errorbar(step + 0.15, tr, yerr=Z95 * tse, fmt="s", ms=3.5, color=orange, capsize=0, lw=0.8,
               label="truth (same step, re-measured on E)")
    a.plot(step, ms, "x", color=green, ms=5, label="measured on fresh samples")
    a.set(xlabel="GRPO step", ylabel="entropy change of the step (nats)",
          title=f"Forecast before each step vs what happened\ninside the forecast's 95% interval: truth "
                f"{summary['coverage95']:.0%}, fresh-sample change {summary['coverage95_measured']:.0%} of steps")
    a.legend(fontsize=8, loc="lower right")

    a = ax[0, 1]
    lim = np.array([min(fc.min(), tr.min()), max(fc.max(), tr.max())])
    lim = lim + np.array([-1, 1]) * 0.08 * (lim[1] - lim[0] + 1e-9)
    a.plot(lim, lim, color=grey, lw=0.8, label="truth = forecast")
    a.errorbar(fc, tr, xerr=Z95 * fse, fmt="o", ms=4, color=blue, ecolor="#9ecae1", capsize=0, lw=0.8,
               label="one step (bars: forecast's 95%)")
    a.set(xlim=lim, ylim=lim, xlabel="forecast delta_h1 (nats)", ylabel="truth delta_h (nats)",
          title=f"Forecast vs truth, one point per step\ncorrelation {summary['correlation']:.2f}")
    a.set_aspect("equal")
    a.legend(fontsize=8, loc="upper left")

    a = ax[1, 0]
    h0 = rows[0]["entropy"]
    x = np.concatenate([[0], step])  # entropy before step 1, then after each step
    measured = np.concatenate([col("entropy")[1:], [rows[-1]["entropy_after"]]])
    cum_fc = h0 + np.concatenate([[0], np.cumsum(fc)])
    cum_band = Z95 * np.sqrt(np.concatenate([[0], np.cumsum(fse ** 2)]))
    a.fill_between(x, cum_fc - cum_band, cum_fc + cum_band, color=blue, alpha=0.2, lw=0)
    a.plot(x, cum_fc, color=blue, label="start + summed forecasts (± 95%)")
    a.plot(x, h0 + np.concatenate([[0], np.cumsum(tr)]), color=orange, lw=1, label="start + summed truths")
    es = col("entropy_se")
    a.errorbar(x, np.concatenate([[h0], measured]), yerr=Z95 * np.concatenate([es[:1], es[1:], es[-1:]]),
               fmt="o", ms=3, color="black", capsize=0, lw=0.8, label="measured entropy, fresh samples")
    a.set(xlabel="GRPO step", ylabel="policy entropy (nats per token)", title="Entropy: measured vs forecast")
    a.legend(fontsize=8)

    a = ax[1, 1]
    rw, rse = col("reward"), col("reward_se")
    a.fill_between(step, rw - Z95 * rse, rw + Z95 * rse, color=green, alpha=0.2, lw=0)
    a.plot(step, rw, color=green, marker="o", ms=3, label="mean reward (fresh samples, ± 95%)")
    a.set(xlabel="GRPO step", ylabel="reward (fraction of answer positions right)",
          title="Reward: sort the prompt's digits")
    a.legend(fontsize=8, loc="lower right")
    fig.suptitle("entropy-probe demo: GRPO on a tiny transformer, every step forecast before it is taken",
                 fontsize=13)
    path = out / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(console, rows: list[dict], summary: dict, out: Path) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title="GRPO steps (entropy changes in nats, ± one SE)", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("step", "reward", "entropy", "forecast", "truth", "measured", "in 95%"):
        table.add_column(name, justify="right")
    every = max(1, len(rows) // 20)
    for r in rows:
        if (r["step"] - 1) % every and r is not rows[-1]:
            continue
        table.add_row(str(r["step"]), f"{r['reward']:.3f}", f"{r['entropy']:.3f}",
                      f"{r['forecast']:+.3f}±{r['forecast_se']:.3f}", f"{r['truth']:+.3f}±{r['truth_se']:.3f}",
                      f"{r['measured']:+.3f}±{r['measured_se']:.3f}", "yes" if r["truth_inside"] else "[red]no")
    console.print(table)
    s = summary
    lines = Table(title="Summary", show_header=False)
    lines.add_column(justify="left")
    lines.add_column(justify="right")
    lines.add_row("reward (first -> last steps)", f"{s['reward_start']:.3f} -> {s['reward_end']:.3f}")
    lines.add_row("entropy (start -> end, nats)", f"{s['entropy_start']:.3f} -> {s['entropy_end']:.3f}")
    lines.add_row("truth inside the forecast's 95% interval", f"{s['coverage95']:.0%} of {s['steps']} steps")
    lines.add_row("fresh-sample change within 95% of forecast", f"{s['coverage95_measured']:.0%}")
    lines.add_row("z of fresh-sample change vs forecast: mean, sd", f"{s['measured_z_mean']:+.2f}, "
                  f"{s['measured_z_sd']:.2f}")
    lines.add_row("correlation forecast / truth", f"{s['correlation']:.3f}")
    lines.add_row("correlation forecast / fresh-sample change", f"{s['correlation_measured']:.3f}")
    lines.add_row("summed forecasts", f"{s['sum_forecast']:+.3f} ± {s['sum_forecast_se']:.3f}")
    lines.add_row("summed truths / fresh-sample changes", f"{s['sum_truth']:+.3f} / {s['sum_measured']:+.3f}")
    lines.add_row("mean truth - forecast per step", f"{s['mean_truth_minus_forecast']:+.4f} ± "
                  f"{s['mean_truth_minus_forecast_se']:.4f}")
    lines.add_row("real AdamW step vs forecast's step (rel. error)", f"{s['max_step_relative_error']:.1e}")
    console.print(lines)
    console.print(f"wrote {out / 'demo.json'}, {out / 'steps.csv'}, {out / 'demo.png'}")


# ---- the command -----------------------------------------------------------------------------------
def run(cfg: DemoConfig, console=None) -> dict:
    """The whole demo; returns the contents of demo.json."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    start = time.perf_counter()
    torch.set_num_threads(cfg.threads)
    task = SortingTask(n_digits=cfg.n_digits)
    torch.manual_seed(cfg.seed)  # the model's random init
    model = build_model(cfg, task).to(cfg.device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    probe = EntropyProbe(model, optimizer, ProbeConfig(direction="optimizer-step", max_grad_norm=cfg.max_grad_norm
                                                       if cfg.max_grad_norm else None))
    rows: list[dict] = []
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("warm-up", total=cfg.warmup_steps, info="")
        warm_loss = supervised_warmup(model, optimizer, task, cfg, data_gen, on_step=lambda loss: progress.update(
            bar, advance=1, info=f"token NLL {loss:.3f}"))
        for group in optimizer.param_groups:  # same AdamW (its moments carry over), RL learning rate
            group["lr"] = cfg.lr
        bar = progress.add_task("GRPO", total=cfg.steps, info="")
        for step in range(cfg.steps):
            r = rl_step(step, model, optimizer, probe, task, cfg, data_gen)
            rows.append(r)
            progress.update(bar, advance=1, info=(
                f"reward {r['reward']:.3f}  entropy {r['entropy']:.3f}  forecast {r['forecast']:+.4f} ± "
                f"{r['forecast_se']:.4f}  truth {r['truth']:+.4f}"))
    summary = summarize(rows)
    out = Path(cfg.out)
    extra = dict(warmup_final_loss=warm_loss, n_parameters=sum(p.numel() for p in model.parameters()),
                 runtime_s=time.perf_counter() - start)
    write_files(out, cfg, rows, summary, extra)
    plot(out, rows, summary)
    print_report(console, rows, summary, out)
    return dict(config=asdict(cfg), summary=summary, steps=rows, **extra)


def parse_args(argv: list[str] | None) -> DemoConfig:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="entropy-probe demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=d.steps, help="GRPO steps")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the whole run (init, data, sampling)")
    p.add_argument("--arch", choices=("gpt2", "llama"), default=d.arch, help="Hugging Face model class")
    p.add_argument("--layers", type=int, default=d.layers, help="transformer layers")
    p.add_argument("--width", type=int, default=d.width, help="hidden size")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    p.add_argument("--n-digits", type=int, default=d.n_digits, help="digits 0..n-1 in the sorting task")
    p.add_argument("--update-prompts", type=int, default=d.update_prompts, help="B_U: prompts per update batch")
    p.add_argument("--eval-prompts", type=int, default=d.eval_prompts, help="B_E: prompts per probe eval batch")
    p.add_argument("--measure-prompts", type=int, default=d.measure_prompts,
                   help="prompts of the fresh samples that measure the entropy before and after each step")
    p.add_argument("--group-size", type=int, default=d.group_size, help="G: responses per prompt (>= 2)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate of the GRPO steps")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="supervised warm-up steps (0: none)")
    p.add_argument("--warmup-lr", type=float, default=d.warmup_lr, help="AdamW learning rate of the warm-up")
    p.add_argument("--warmup-batch", type=int, default=d.warmup_batch, help="examples per warm-up step")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="CPU threads for torch (a model this small runs fastest on one; results are "
                        "bit-reproducible for a given seed and thread count)")
    p.add_argument("--out", default=d.out, help="output folder for demo.json, steps.csv, demo.png")
    a = p.parse_args(argv)
    cfg = DemoConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})
    for name in ("steps", "layers", "width", "heads", "update_prompts", "eval_prompts", "measure_prompts", "threads"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.group_size < 2:
        p.error(f"--group-size must be >= 2 (GRPO compares responses within a group), got {cfg.group_size}")
    if cfg.eval_prompts < 2:
        p.error(f"--eval-prompts must be >= 2 for a standard error, got {cfg.eval_prompts}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        p.error(f"--lr must be a finite number > 0, got {cfg.lr}")
    return cfg


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0
