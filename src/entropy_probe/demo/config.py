"""``DemoConfig``: every option of ``entropy-probe demo``, and the command line that fills it."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

DESCRIPTION = "GRPO fine-tuning of a tiny transformer, the probe forecasting every step (docs/demo.md)."


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
    entropy: str = "token"
    """The probe's functional, passed as ``ProbeConfig(entropy=...)``: "token" (the trainers' logged
    ``sum(m H_t) / sum(m)``, docs/token_entropy.md) or "sequence" (``E[-S_w]``, token-mean weighting)."""
    entropy_budget: float | None = None
    """None: plain GRPO; else each step is shrunk by ``EntropyGuard(entropy_budget)`` (docs/guard.md)."""


def parse_args(argv: list[str] | None) -> DemoConfig:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="entropy-probe demo",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=d.steps, help="GRPO steps")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the whole run (init, data, sampling)")
    p.add_argument("--arch", choices=("gpt2", "llama"), default=d.arch, help="Hugging Face model class")
    p.add_argument("--layers", type=int, default=d.layers, help="transformer layers")
    p.add_argument("--width", type=int, default=d.width, help="hidden size")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    p.add_argument("--n-digits", type=int, default=d.n_digits, help="digits 0..n-1 in the sorting task")
    p.add_argument(
        "--update-prompts", type=int, default=d.update_prompts, help="B_U: prompts per update batch"
    )
    p.add_argument(
        "--eval-prompts", type=int, default=d.eval_prompts, help="B_E: prompts per probe eval batch"
    )
    p.add_argument(
        "--measure-prompts",
        type=int,
        default=d.measure_prompts,
        help="prompts of the fresh samples that measure the entropy before and after each step",
    )
    p.add_argument("--group-size", type=int, default=d.group_size, help="G: responses per prompt (>= 2)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate of the GRPO steps")
    p.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="supervised warm-up steps (0: none)"
    )
    p.add_argument("--warmup-lr", type=float, default=d.warmup_lr, help="AdamW learning rate of the warm-up")
    p.add_argument("--warmup-batch", type=int, default=d.warmup_batch, help="examples per warm-up step")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="CPU threads for torch (a model this small runs fastest on one; results are "
        "bit-reproducible for a given seed and thread count)",
    )
    p.add_argument(
        "--entropy",
        choices=("token", "sequence"),
        default=d.entropy,
        help="the entropy functional forecast and measured: token (what TRL/verl log: the mean over all "
        "response tokens of the full-vocabulary entropy) or sequence (mean per-response surprisal)",
    )
    p.add_argument("--out", default=d.out, help="output folder for demo.json, steps.csv, demo.png")
    p.add_argument(
        "--entropy-budget",
        type=float,
        default=d.entropy_budget,
        help="nats: guard each GRPO step so its forecast entropy drop (95%% bound) stays within it",
    )
    a = p.parse_args(argv)
    cfg = DemoConfig(**{k.replace("-", "_"): v for k, v in vars(a).items()})
    for name in (
        "steps",
        "layers",
        "width",
        "heads",
        "update_prompts",
        "eval_prompts",
        "measure_prompts",
        "threads",
    ):
        if getattr(cfg, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.group_size < 2:
        p.error(f"--group-size must be >= 2 (GRPO compares responses within a group), got {cfg.group_size}")
    if cfg.eval_prompts < 2:
        p.error(f"--eval-prompts must be >= 2 for a standard error, got {cfg.eval_prompts}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        p.error(f"--lr must be a finite number > 0, got {cfg.lr}")
    if cfg.entropy_budget is not None and not (cfg.entropy_budget > 0 and math.isfinite(cfg.entropy_budget)):
        p.error(f"--entropy-budget must be a finite number of nats > 0, got {cfg.entropy_budget}")
    return cfg
