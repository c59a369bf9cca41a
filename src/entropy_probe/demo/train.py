"""``entropy-probe demo``: GRPO fine-tuning of a tiny transformer, the probe forecasting every step.

Run it with ``make demo`` (sets up .venv first), ``entropy-probe demo --out runs/demo`` or
``PYTHONPATH=src python -m entropy_probe demo --help``. About a minute on 2 CPU cores.

What happens:
1. A small GPT-2 (or Llama) is built from a config (random init, nothing downloaded) and warmed up
   with a few supervised steps on the sorting task (``task.py``), so RL has a start.
2. GRPO with AdamW, for ``--steps`` steps. At every step:
   - sample an update batch U (trained on) and an independent evaluation batch E (probe only);
   - measure the entropy on fresh samples F (``H_before``);
   - run the probe on the step AdamW is about to take (``direction="optimizer-step"``): the forecast
     ``delta_h1`` with its SE over E, the unconditional SE, the second-order forecast
     ``delta_h1 + delta_h2``, delta_h1 by parameter group, and the truth (the same step applied
     functionally, entropy re-measured on E by importance weighting, docs/design.md section 10);
   - take the real AdamW step with the same loss the probe differentiates;
   - measure the entropy again on fresh samples drawn with the same seed and prompts as F
     (``H_after``; common random numbers make the paired difference precise): the measured change.
3. A table, the coverage of the forecast's 95% intervals, the correlation of forecast and truth,
   plots, ``demo.json`` and ``steps.csv`` in ``--out``. docs/demo.md explains every number.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..guard import EntropyGuard
from ..logprobs import sequence_logprobs
from ..loss import policy_loss
from ..probe import EntropyProbe
from ..sampling import sample_rollouts
from ..statistics import Z95
from .config import DemoConfig
from .entropy_plot import entropy_plot
from .fresh import entropy_mean_se, fresh_sample, mean_se, paired_change, trainer_entropy
from .layers import INFLUENCE_KEY, influence_plot, layer_plot
from .report import plot, print_report, summarize, table_rows, write_files
from .task import SortingTask


# ---- model and losses ---------------------------------------------------------------------------
def build_model(cfg: DemoConfig, task: SortingTask) -> nn.Module:
    """A causal LM from a Hugging Face config, random init (seeded by the caller), no dropout.

    No dropout, so train and eval mode compute the same function: the step the probe forecasts
    (evaluated in eval mode) is the step training takes.
    """
    positions = task.max_len + 1 + task.max_new_tokens
    if cfg.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=task.vocab_size,
            n_positions=positions,
            n_embd=cfg.width,
            n_layer=cfg.layers,
            n_head=cfg.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=task.eos,
            pad_token_id=task.eos,
        )
        return GPT2LMHeadModel(config)
    if cfg.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=task.vocab_size,
            hidden_size=cfg.width,
            intermediate_size=2 * cfg.width,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=positions,
            bos_token_id=None,
            eos_token_id=task.eos,
            pad_token_id=task.eos,
        )
        return LlamaForCausalLM(config)
    raise ValueError(f"demo --arch must be 'gpt2' or 'llama', got {cfg.arch!r}")


def supervised_warmup(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    task: SortingTask,
    cfg: DemoConfig,
    gen: torch.Generator,
    on_step=None,
) -> float:
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


GUARD_COLUMNS = ("scale", "reason", "forecast", "bound", "se")  # steps.csv's guard_* with --entropy-budget


# ---- one RL step -----------------------------------------------------------------------------------
def _seed(cfg: DemoConfig, step: int, role: int) -> int:
    """A distinct, reproducible seed for each (run seed, step, role)."""
    return (cfg.seed * 1_000_003 + step * 16 + role) % (2**63)


def rl_step(
    step: int, probe: EntropyProbe, task: SortingTask, cfg: DemoConfig, prompt_gen: torch.Generator
) -> dict:
    """Sample U, E and F; forecast; step; measure. Returns one row of steps.csv.

    The model and the optimizer are the probe's (``probe.model``, ``probe.optimizer``)."""
    model, pc = probe.model, probe.config

    def sample(prompts, seed: int) -> RolloutBatch:
        return sample_rollouts(
            model, prompts, cfg.group_size, task.max_new_tokens, task.eos, task.reward, pc.temperature, seed
        )

    u_prompts = task.prompts(cfg.update_prompts, prompt_gen)
    u_batch = sample(u_prompts, _seed(cfg, step, 0))
    e_batch = sample(task.prompts(cfg.eval_prompts, prompt_gen), _seed(cfg, step, 1))
    f_prompts = task.prompts(cfg.measure_prompts, prompt_gen)
    before = fresh_sample(model, task, f_prompts, cfg, _seed(cfg, step, 2), pc)

    logged = trainer_entropy(model, u_batch, pc.temperature)  # what a trainer logs for this step's batch
    result = probe.run(u_batch, e_batch, truth=True)
    v = probe.update_direction(u_batch)  # to check that the real step is the forecast's step
    theta = {name: p.detach().clone() for name, p in probe.parameters().items()}
    decision = _optimizer_step(probe, u_batch, result, cfg)
    scale = decision.scale if decision is not None else 1.0
    step_error = _step_relative_error(probe, theta, v, scale * result.lr)  # the lr of the step taken
    after = fresh_sample(model, task, f_prompts, cfg, _seed(cfg, step, 2), pc)  # same seed and prompts

    row = _row(step, result, scale, u_batch, (before, after), step_error)
    row.update(trainer_entropy=logged, probe_entropy=result.entropy)  # the dashboard's number, the probe's
    # each U prompt's influence on delta_h1 (result.update_influence), for influence.png; not a CSV column
    row[INFLUENCE_KEY] = [
        (" ".join(str(d) for d in u_prompts[int(g)][:-1]), float(x))
        for g, x in zip(result.update_unit_ids, result.update_influence)
    ]
    if decision is not None:  # the guard's columns (forecast, bound, se: of the step taken, at the scale)
        row.update({f"guard_{k}": getattr(decision, k) for k in GUARD_COLUMNS})
    return row


def _optimizer_step(probe: EntropyProbe, u_batch: RolloutBatch, result, cfg: DemoConfig):
    """The trainer's real step on U (the guard's decision, or None without an entropy budget)."""
    model, optimizer = probe.model, probe.optimizer
    model.train()
    optimizer.zero_grad(set_to_none=True)
    policy_loss(model, u_batch, probe.config).backward()
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
    guard = EntropyGuard(cfg.entropy_budget) if cfg.entropy_budget is not None else None
    decision = guard.decide(result) if guard is not None else None
    # the guard scales the lr of this one step (AdamW is linear in lr), back to cfg.lr right after it
    with guard.applied(optimizer, decision) if guard is not None else contextlib.nullcontext():
        optimizer.step()
    return decision


@torch.no_grad()
def _step_relative_error(probe: EntropyProbe, theta: dict, v: dict, eta: float) -> float:
    """||theta_after - theta - eta v|| / ||eta v||: float noise only (Adam rescales the round-off of
    gradients that are analytically zero, e.g. GPT-2's key biases, into small steps)."""
    moved = {n: p.detach() - theta[n] for n, p in probe.parameters().items()}
    step_error = math.sqrt(sum(float((moved[n] - eta * v[n]).square().sum()) for n in moved))
    step_size = math.sqrt(sum(float((eta * v[n]).square().sum()) for n in moved))
    return step_error / step_size if step_size > 0 else 0.0


def _row(step: int, result, scale: float, u_batch: RolloutBatch, fresh: tuple, step_error: float) -> dict:
    """One row of steps.csv; ``fresh``: the fresh samples before and after the step (``fresh.Fresh``)."""
    before, after = fresh
    # the first-order forecast of the step taken (at the guard's scale), which the fresh samples measure
    taken, taken_se = scale * result.delta_h1, scale * result.se_cond_e
    reward, reward_se = mean_se(before.reward)
    entropy, entropy_se = entropy_mean_se(before)
    entropy_after, _ = entropy_mean_se(after)
    measured, measured_se = paired_change(before, after)  # paired by unit
    t = result.truth
    lo, hi = result.interval(z=Z95)  # the normal interval: the report's error bars are Z95 * forecast_se
    return dict(
        step=step + 1,
        reward=reward,
        reward_se=reward_se,
        reward_update=float(u_batch.rewards.mean()),
        entropy=entropy,
        entropy_se=entropy_se,
        entropy_after=entropy_after,
        forecast=result.delta_h1,
        forecast_se=result.se_cond_e,
        forecast_se_jackknife=result.se_jackknife,
        forecast_se_total=result.se_total,
        forecast_lo95=lo,
        forecast_hi95=hi,
        truth=t.delta_h,
        truth_se=t.se,
        truth_ess=t.ess,
        truth_reliable=int(t.reliable),
        truth_se_diff=t.se_diff,
        truth_inside=int(lo <= t.delta_h <= hi),
        measured=measured,
        measured_se=measured_se,
        measured_z=(measured - taken) / math.sqrt(taken_se**2 + measured_se**2),
        step_relative_error=step_error,
        **second_order_columns(result),
    )


def second_order_columns(result) -> dict:
    """The forecast with the second order (docs/design.md section 8) and delta_h1 by parameter group
    (section 9)."""
    t = result.truth
    lo, hi = result.forecast_interval(0.95)
    out = dict(
        delta_h2=result.delta_h2,
        delta_h2_se=result.se_delta_h2,
        forecast2=result.forecast,
        forecast2_se=result.se_forecast,
        forecast2_lo95=lo,
        forecast2_hi95=hi,
        truth_inside2=int(lo <= t.delta_h <= hi),
        truth_se_diff2=t.se_diff_forecast,
    )
    out.update({f"group:{name}": value for name, (value, _) in result.by_group.items()})
    return out


# ---- summary ---------------------------------------------------------------------------------------


# ---- the command -----------------------------------------------------------------------------------
def build(cfg: DemoConfig) -> tuple[SortingTask, EntropyProbe, torch.Generator]:
    """The task, the probe on the seeded model and its AdamW (warm-up lr), and the data generator."""
    torch.set_num_threads(cfg.threads)
    task = SortingTask(n_digits=cfg.n_digits)
    torch.manual_seed(cfg.seed)  # the model's random init
    model = build_model(cfg, task).to(cfg.device)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    probe_cfg = ProbeConfig(
        entropy=cfg.entropy,  # the functional asked for, explicitly (not the library's default)
        direction="optimizer-step",
        max_grad_norm=cfg.max_grad_norm if cfg.max_grad_norm else None,
        second_order=True,
        by_group=True,  # layers.png: the split by layer, from the backward engine's per-unit loop
    )
    return task, EntropyProbe(model, optimizer, probe_cfg), data_gen


def run(cfg: DemoConfig, console=None) -> dict:
    """The whole demo; returns the contents of demo.json."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    start = time.perf_counter()
    task, probe, data_gen = build(cfg)
    model, optimizer = probe.model, probe.optimizer
    rows: list[dict] = []
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("warm-up", total=cfg.warmup_steps, info="")
        warm_loss = supervised_warmup(
            model,
            optimizer,
            task,
            cfg,
            data_gen,
            on_step=lambda loss: progress.update(bar, advance=1, info=f"token NLL {loss:.3f}"),
        )
        for group in optimizer.param_groups:  # same AdamW (its moments carry over), RL learning rate
            group["lr"] = cfg.lr
        bar = progress.add_task("GRPO", total=cfg.steps, info="")
        for step in range(cfg.steps):
            r = rl_step(step, probe, task, cfg, data_gen)
            rows.append(r)
            progress.update(
                bar,
                advance=1,
                info=(
                    f"reward {r['reward']:.3f}  entropy {r['entropy']:.3f}  forecast {r['forecast']:+.4f} ± "
                    f"{r['forecast_se']:.4f}  truth {r['truth']:+.4f}"
                ),
            )
    summary = summarize(rows)
    out = Path(cfg.out)
    extra = dict(
        warmup_final_loss=warm_loss,
        n_parameters=sum(p.numel() for p in model.parameters()),
        runtime_s=time.perf_counter() - start,
    )
    write_files(out, cfg, rows, summary, extra)
    plot(out, rows, summary)
    entropy_plot(out, rows, summary, cfg.entropy)
    layer_plot(out, rows)
    influence_plot(out, rows)
    console.print(f"entropy functional: ProbeConfig(entropy={cfg.entropy!r}) (docs/token_entropy.md)")
    print_report(console, rows, summary, out)
    return dict(config=asdict(cfg), summary=summary, steps=table_rows(rows), **extra)
