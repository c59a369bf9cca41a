"""Large steps in a real TRL ``GRPOTrainer`` at lr 5e-3, checked against fresh samples (docs/large_steps.md).

    PYTHONPATH=src python examples/trl_large_steps.py --steps 24 --record docs/records/trl_large_steps.json

The GRPO job of examples/trl_grpo.py (a tiny Qwen2 from its config, a local word tokenizer, prompts from
``Dataset.from_dict``) at a constant lr 5e-3 with a fresh AdamW, whose first steps move every parameter
by about ``lr``. The ``EntropyProbeCallback`` forecasts every step with ``lookahead="always"``, so each
record holds ``reliable`` (the diagnostic before the step), the Taylor forecast and the lookahead (the
step applied on E before it is taken). Independently, a second callback samples fresh rollouts F (other
prompts, G responses each) before the real ``optimizer.step()`` and again after it, with the same
prompts and seed, and measures the step's change of the probe's entropy functional, ``-mean S_w``, as
the mean over F's units of the paired per-unit differences, with its SE.

Criterion (issue 20): the fraction of steps that are either flagged before the step (``reliable``
False), or whose prediction (what ``lookahead="auto"`` predicts with when the step is not flagged: the
Taylor forecast) covers the fresh-sample change, ``|prediction - fresh| <= 1.96 sqrt(se^2 + se_fresh^2)``,
while its SE is at most twice the lookahead's own (the functional step's SE on the same E).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_grpo import build_model, build_tokenizer, grpo_args, prompts, reward_a  # noqa: E402

Z95 = 1.959964


class FreshSampleChange(TrainerCallback):
    """The entropy change of each real optimizer step on fresh samples: the same prompts and seed before
    and after the step (paired per unit), the probe's functional (``unit_entropy`` of ``S_w``)."""

    def __init__(self, prompt_ids: list[list[int]], group_size: int, max_new_tokens: int, config, tokenizer):
        self.prompt_ids, self.group_size, self.max_new_tokens = prompt_ids, group_size, max_new_tokens
        self.config, self.tokenizer = config, tokenizer
        self.rows: list[dict] = []
        self._before: torch.Tensor | None = None

    def _unit_entropy(self, model, seed: int) -> torch.Tensor:
        from entropy_probe.logprobs import policy_logprobs
        from entropy_probe.objectives import unit_entropy
        from entropy_probe.sampling import sample_rollouts

        tok = self.tokenizer
        batch = sample_rollouts(
            model, self.prompt_ids, self.group_size, self.max_new_tokens, tok.eos_token_id, None,
            self.config.temperature, seed, pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        with torch.no_grad():
            weighted = policy_logprobs(model, batch, self.config).weighted
        return unit_entropy(weighted, batch).double().cpu()  # (B_F,)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._before = self._unit_entropy(model, seed=10_000 + state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        diff = self._unit_entropy(model, seed=10_000 + state.global_step) - self._before  # (B_F,)
        self.rows.append(dict(fresh=float(diff.mean()), fresh_se=float(diff.std() / math.sqrt(diff.numel()))))
        self._before = None


def judge(record: dict, fresh: dict) -> dict:
    """One step's row: the probe's figures (from the callback's record), the fresh-sample change, ok."""
    taylor, taylor_se = record["delta_h1"], record["se_cond_e"]  # first order (second_order=False)
    look, look_se = record["lookahead/delta_h"], record["lookahead/se"]
    # what lookahead="auto" would predict with: the Taylor forecast when reliable, else the lookahead
    auto, auto_se = (taylor, taylor_se) if record["reliable"] else (look, look_se)
    combined = math.sqrt(auto_se**2 + fresh["fresh_se"] ** 2)
    covers = abs(auto - fresh["fresh"]) <= Z95 * combined
    narrow = auto_se <= 2 * look_se
    return dict(
        step=record["step"],
        reliable=bool(record["reliable"]),
        step_ess_fraction=record["step_ess_fraction"],
        prediction=record["prediction/value"],
        prediction_se=record["prediction/se"],
        prediction_method=record["prediction_method"],
        prediction_reliable=bool(record["prediction/reliable"]),
        first_order=taylor,
        first_order_se=taylor_se,
        first_order_lo95=record["interval_lo95"],
        first_order_hi95=record["interval_hi95"],
        lookahead=look,
        lookahead_se=look_se,
        lookahead_reliable=bool(record["lookahead/reliable"]),
        measured_same_e=record["measured/delta_h"],
        measured_same_e_se=record["measured/se"],
        fresh=fresh["fresh"],
        fresh_se=fresh["fresh_se"],
        auto_prediction=auto,
        auto_prediction_se=auto_se,
        covers=bool(covers),
        no_wider=bool(narrow),
        ok=bool((not record["reliable"]) or (covers and narrow)),
        lookahead_covers=bool(abs(look - fresh["fresh"]) <= Z95 * math.hypot(look_se, fresh["fresh_se"])),
    )


def summarise(rows: list[dict]) -> dict:
    n = len(rows)
    kept = [r for r in rows if r["reliable"]]
    return dict(
        steps=n,
        flagged=n - len(kept),
        covered_when_not_flagged=sum(r["covers"] and r["no_wider"] for r in kept),
        ok=sum(r["ok"] for r in rows),
        ok_rate=sum(r["ok"] for r in rows) / n,
        passes=sum(r["ok"] for r in rows) / n >= 0.9,
        lookahead_covers=sum(r["lookahead_covers"] for r in rows),
        first_step_fresh=rows[0]["fresh"],
        first_step_first_order=rows[0]["first_order"],
        first_step_lookahead=rows[0]["lookahead"],
    )


def main() -> None:
    from datasets import Dataset
    from trl import GRPOTrainer

    from entropy_probe import ProbeConfig
    from entropy_probe.integrations.trl import EntropyProbeCallback, attach, tokenise_prompt

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/trl_large_steps")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--fresh-prompts", type=int, default=32)
    parser.add_argument("--record", type=Path, help="also save the figures as a record (docs/records/)")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer()
    args = grpo_args(out, opts.steps, seed=0, learning_rate=opts.lr, lr_scheduler_type="constant")
    trainer = GRPOTrainer(
        model=build_model(tokenizer),
        reward_funcs=reward_a,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts(256, seed=1)}),
        processing_class=tokenizer,
    )
    # the sequence functional: the fresh-sample measurement below is of -mean S_w (unit_entropy), so the
    # forecast must be of the same functional (the callback's default, "token", is not)
    config = ProbeConfig(direction="optimizer-step", lookahead="always", entropy="sequence")
    probe_cb = attach(
        trainer,
        EntropyProbeCallback(
            prompts(8, seed=2), every=1, group_size=8, max_new_tokens=8, config=config, max_eval_units=8
        ),
    )
    fresh_prompts = [tokenise_prompt(tokenizer, p) for p in prompts(opts.fresh_prompts, seed=3)]
    fresh_cb = FreshSampleChange(
        fresh_prompts, 8, 8, replace(config, temperature=args.temperature), tokenizer
    )
    trainer.add_callback(fresh_cb)
    start = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the flag is recorded per step
        trainer.train()
    rows = [judge(r, f) for r, f in zip(probe_cb.records, fresh_cb.rows, strict=True)]
    summary = dict(summarise(rows), runtime_s=time.time() - start)
    for r in rows:
        print(
            f"step {r['step']:2d} reliable {r['reliable']!s:5} rho {r['step_ess_fraction']:.2f} "
            f"first-order {r['first_order']:+.4f}±{r['first_order_se']:.4f} lookahead "
            f"{r['lookahead']:+.4f}±{r['lookahead_se']:.4f} fresh {r['fresh']:+.4f}±{r['fresh_se']:.4f} "
            f"ok {r['ok']}"
        )
    print(
        f"{summary['steps']} steps: {summary['flagged']} flagged, {summary['covered_when_not_flagged']} of "
        f"the rest covered; ok {summary['ok_rate']:.0%} (>= 90%: {summary['passes']})"
    )
    data = dict(
        options=dict(
            steps=opts.steps, lr=opts.lr, fresh_prompts=opts.fresh_prompts, group_size=8, eval_units=8
        ),
        summary=summary,
        steps=rows,
    )
    (out / "trl_large_steps.json").write_text(json.dumps(data, indent=1))
    if opts.record:
        from entropy_probe.records import write_record

        write_record(opts.record, ["python", "examples/trl_large_steps.py", *sys.argv[1:]], data)


if __name__ == "__main__":
    main()
