"""Entropy control head to head in a real TRL GRPOTrainer, one seed, CPU (a few minutes).

    python examples/trl_entropy_control.py --seed S --out DIR [--steps 60]

Five runs of the same GRPO job (examples/trl_grpo.py: a tiny Qwen2 from its config, a local word
tokenizer, reward for saying "a", which collapses the policy's entropy), identical but for the control:

- ``none``: plain GRPO;
- ``adaptive``: TRL's own adaptive entropy bonus, ``GRPOConfig(use_adaptive_entropy=True,
  entropy_target=..., entropy_coef=0, entropy_coef_delta=...)`` (Skywork-OR1): the bonus coefficient
  rises by ``delta`` after each step whose logged entropy is at or below the target, falls otherwise;
- ``guard``: ``EntropyProbeCallback(entropy_budget=...)``: before each step the probe forecasts its
  entropy change on 8 held-out prompts and ``EntropyGuard`` shrinks that step's learning rate so that
  the forecast drop, at its 95% lower bound, stays within the budget;
- ``controller-scale``: ``EntropyProbeCallback(entropy_target=..., control_mode="scale")``: the step's
  lr is shrunk so that the predicted entropy after it, with its 95% interval, stays in target -+ band;
- ``controller-steer``: ``control_mode="steer"``: an entropy bonus along the entropy gradient of half
  of E, its coefficient solved so that the other half's prediction lands in the band (docs/control.md).

Entropy is TRL's own logged ``entropy`` (mean per-token entropy over the completions of each step's
batch), the same yardstick for all. Prints one table (rich) and writes ``entropy_control.png`` and
``entropy_control.json`` (``runs[method]["entropy"]``, ``["reward"]``, the options) to ``--out``.
docs/control.md reports three seeds (``docs/records/entropy_control_seed*.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_grpo import build_model, build_tokenizer, grpo_args, prompts, reward_a

CONTROLS = ("none", "adaptive", "guard", "controller-scale", "controller-steer")


def train_one(control: str, opts, out: Path) -> dict:
    """One GRPO run with the given control; its per-step entropy, reward and the control's own numbers."""
    from datasets import Dataset
    from trl import GRPOTrainer

    from entropy_probe.integrations.trl import EntropyProbeCallback, attach

    extra = {}
    if control == "adaptive":
        extra = {
            "use_adaptive_entropy": True,
            "entropy_target": opts.entropy_target,
            "entropy_coef": 0.0,
            "entropy_coef_delta": opts.coef_delta,
        }
    tokenizer = build_tokenizer()
    args = grpo_args(out / control, opts.steps, seed=opts.seed, **extra)
    trainer = GRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=reward_a,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts(256, seed=1)}),
        processing_class=tokenizer,
    )
    (out / control).mkdir(parents=True, exist_ok=True)
    callback = None
    if control != "none" and control != "adaptive":
        (out / control / "entropy_probe.jsonl").unlink(missing_ok=True)  # the callback appends
        own = {"entropy_budget": opts.budget}
        if control.startswith("controller-"):
            own = {
                "entropy_target": opts.entropy_target,
                "control_mode": control.split("-")[1],
                "control_band": opts.band,
                "control_entropy": opts.control_entropy,
            }
        callback = attach(
            trainer,
            EntropyProbeCallback(
                prompts(8, seed=2),
                group_size=8,
                max_new_tokens=8,
                max_eval_units=8,  # all 8 prompts every step (the default: the trainer's 4 per step)
                **own,
            ),
        )
    start = time.perf_counter()
    with open(out / control / "train.log", "w") as log, contextlib.redirect_stdout(log):  # the Trainer's logs
        trainer.train()
    wall = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "entropy" in h and "reward" in h]
    run = {
        "control": control,
        "wall_s": wall,
        "entropy": [h["entropy"] for h in logs],
        "reward": [h["reward"] for h in logs],
    }
    if control == "adaptive":
        run["entropy_coef"] = [h.get("entropy_coef", 0.0) for h in logs]
    if control == "guard":
        run["guard_scale"] = [r["guard_scale"] for r in callback.records]
        run["guard_reason"] = [r["guard_reason"] for r in callback.records]
    if control.startswith("controller-"):
        for key in ("scale", "coefficient", "predicted", "entropy"):
            run[f"control_{key}"] = [r[f"control/{key}"] for r in callback.records]
        run["control_reason"] = [r["control_reason"] for r in callback.records]
    return run


def summary(run: dict, target: float) -> dict:
    """The issue's figures: tracking error |H - target| from the first step at or below the target on,
    the minimum entropy after step 10, the mean reward of the last 10 steps, the wall time."""
    k = 10  # final reward: mean of the last k steps' batch rewards (one step is 4 prompts x 8)
    h, r = run["entropy"], run["reward"]
    reached = next((i for i, x in enumerate(h) if x <= target), None)
    s = {
        "entropy_start": h[0],
        "entropy_min": min(h),
        "entropy_min_after_10": min(h[10:]) if len(h) > 10 else min(h),
        "entropy_final": h[-1],
        "tracking_error": None
        if reached is None
        else sum(abs(x - target) for x in h[reached:]) / len(h[reached:]),
        "target_reached_at": None if reached is None else reached + 1,
        "reward_start": r[0],
        "reward_final": sum(r[-k:]) / k,
        "wall_s": run["wall_s"],
    }
    if "guard_scale" in run:
        s["fraction_scaled"] = sum(r == "scaled" for r in run["guard_reason"]) / len(run["guard_reason"])
        s["mean_scale"] = sum(run["guard_scale"]) / len(run["guard_scale"])
    if "entropy_coef" in run:
        s["entropy_coef_final"] = run["entropy_coef"][-1]
    if "control_scale" in run:
        s["mean_scale"] = sum(run["control_scale"]) / len(run["control_scale"])
        s["mean_coefficient"] = sum(run["control_coefficient"]) / len(run["control_coefficient"])
    return s


def print_table(runs: dict, opts) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GRPO, seed {opts.seed}, {opts.steps} steps (entropy: TRL's logged, per token)")
    for col in (
        "control",
        "entropy start",
        "tracking error",
        "min entropy after 10",
        "final entropy",
        "reward, last 10",
        "wall (s)",
        "control's own",
    ):
        table.add_column(col, justify="left" if col in ("control", "control's own") else "right")
    for name, run in runs.items():
        s = summary(run, opts.entropy_target)
        own = {
            "none": "-",
            "adaptive": f"target {opts.entropy_target:g}; final coef {s.get('entropy_coef_final', 0):.3f}",
            "guard": f"budget {opts.budget:g}; {s.get('fraction_scaled', 0):.0%} of steps scaled, "
            f"mean scale {s.get('mean_scale', 1):.2f}",
            "controller-scale": f"band {opts.band:g}; mean scale {s.get('mean_scale', 1):.2f}",
            "controller-steer": f"band {opts.band:g}; mean lambda {s.get('mean_coefficient', 0):.3g}",
        }[name]
        err = "-" if s["tracking_error"] is None else f"{s['tracking_error']:.3f}"
        table.add_row(
            name,
            f"{s['entropy_start']:.3f}",
            err,
            f"{s['entropy_min_after_10']:.3f}",
            f"{s['entropy_final']:.3f}",
            f"{s['reward_final']:.3f}",
            f"{s['wall_s']:.1f}",
            own,
        )
    Console(width=130).print(table)


def plot(runs: dict, path: Path, opts) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "none": "#7f7f7f",
        "adaptive": "#d62728",
        "guard": "#1f77b4",
        "controller-scale": "#2ca02c",
        "controller-steer": "#9467bd",
    }
    labels = {
        "none": "no control",
        "adaptive": f"TRL adaptive entropy (target {opts.entropy_target:g})",
        "guard": f"EntropyGuard (budget {opts.budget:g} nats/step)",
        "controller-scale": f"EntropyController scale (band {opts.band:g})",
        "controller-steer": f"EntropyController steer (band {opts.band:g})",
    }
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for name, run in runs.items():
        steps = range(1, len(run["entropy"]) + 1)
        ax[0].plot(steps, run["entropy"], color=colors[name], label=labels[name])
        ax[1].plot(steps, run["reward"], color=colors[name], label=labels[name])
    ax[0].axhline(opts.entropy_target, color="k", lw=0.6, ls="--")
    ax[0].axhspan(opts.entropy_target - opts.band, opts.entropy_target + opts.band, color="k", alpha=0.06)
    ax[0].set(xlabel="optimizer step", ylabel="per-token entropy (nats, TRL's log)", title="Entropy")
    ax[1].set(xlabel="optimizer step", ylabel="mean reward of the step's batch", title="Reward")
    ax[0].legend(fontsize=8)
    fig.suptitle(f"TRL GRPOTrainer, same seed ({opts.seed}): entropy control head to head")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/trl_entropy_control")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=0.02, help="guard: nats per step at 95%%")
    parser.add_argument(
        "--entropy-target", type=float, default=1.5, help="target entropy (adaptive, controller)"
    )
    parser.add_argument("--band", type=float, default=0.1, help="controller: nats either side of the target")
    parser.add_argument(
        "--control-entropy", default="probe", help="controller: start from the 'probe' or 'trainer' entropy"
    )
    parser.add_argument("--methods", default=",".join(CONTROLS), help="comma-separated subset of the methods")
    parser.add_argument("--coef-delta", type=float, default=0.02, help="TRL adaptive: coefficient step")
    parser.add_argument("--record", type=Path, help="also save the figures as a record (docs/records/)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {control: train_one(control, opts, out) for control in opts.methods.split(",")}
    print_table(runs, opts)
    plot(runs, out / "entropy_control.png", opts)
    options = {k: v for k, v in vars(opts).items() if k != "record"}
    summaries = {k: summary(r, opts.entropy_target) for k, r in runs.items()}
    doc = {"options": options, "summary": summaries, "runs": runs}
    (out / "entropy_control.json").write_text(json.dumps(doc, indent=1))
    print(f"wrote {out / 'entropy_control.png'} and {out / 'entropy_control.json'}")
    if opts.record:
        from entropy_probe.records import write_record

        write_record(opts.record, ["python", "examples/trl_entropy_control.py", *(argv or sys.argv[1:])], doc)
    return doc


if __name__ == "__main__":
    main()
