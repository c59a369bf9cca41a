"""The probe's cost in a real trainer: the same TRL ``GRPOTrainer`` job with and without the callback.

    PYTHONPATH=src python benchmarks/bench_trainer.py [--steps 8] [--repeats 5] [--out runs/bench]

The job is ``examples/trl_grpo.py``'s (tiny Qwen2 from config, word-level tokenizer built with
``tokenizers``, prompts from ``Dataset.from_dict``, DAPO loss, 4 prompts x 8 completions = 32 rows per
optimizer step, CPU, fp32), run for ``--steps`` optimizer steps with the same seed in every arm, so
that every arm trains the very same trajectory (the callback leaves it bit-identical). Every arm but the
jvp one and the shared second-order pass names ``engine="backward"``, the default when their first
records were taken. Arms:

- **off**: no callback;
- **sequence, E = train batch**: ``EntropyProbeCallback`` on every step with ``entropy="sequence"``, 4
  held-out prompts x 8 responses (32 rows, the training batch's size): the reference SE;
- **token, se_target**: ``entropy="token"`` (the Rao-Blackwellised estimator) with ``se_target`` the
  sequence arm's median ``se_cond_e`` (``SEQUENCE_SE``, from ``bench_trainer_after.json``) and at most 4
  units: the first probed step takes 4, the next as few as reach the target (at least 2);
- **token, se_target, jvp**: the same with ``engine="jvp"``: one forward-mode pass per microbatch of E
  units, whose exact dS_i are the large-step diagnostic (no stepped forward), and no ``by_group``;
- **token, se_target, every 4**: the same probing every 4th optimizer step;
- **token, se_target, jvp, every 4**: the jvp arm probing every 4th optimizer step;
- **token, se_target, second order**: with ``second_order=True, by_group=False`` (one nested forward-mode
  pass gives the s_n and the q_n, ``ProbeConfig.shares_second_order_pass``);
- **token, se_target, lookahead**: with ``lookahead="always"`` instead (the step applied on E before it
  is taken: one forward, all orders);
- **sequence, second order**: the sequence arm with ``second_order=True`` (the first-order pass and the
  nested pass).

The arms run alternately in one process, ``--repeats`` times (round r runs every arm once, in order), each
timed over ``trainer.train()`` only, by process CPU time (1 torch thread: the compute itself; the machine
is shared) and by the wall clock. Reported per arm: the median, min and max, and the median of the
per-round ratios to the "off" run of the same round. The probe's own time is split by timing, inside
the callback's calls, the sampling of E (``sample_rollouts``), ``EntropyProbe.run`` (the E pass and
statistics) and ``EntropyProbe.measure_change``; and the ``se_cond_e`` each probed step reached.
Writes ``<out>/bench_trainer.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "examples"))
sys.path.insert(0, str(HERE))

import trl_grpo  # noqa: E402  (the example's tokenizer, model, prompts, reward and GRPOConfig)
from bench_json import write_bench_json  # noqa: E402

import entropy_probe.integrations.trl as trl_integration  # noqa: E402
from entropy_probe import ProbeConfig  # noqa: E402
from entropy_probe.integrations.trl import EntropyProbeCallback, attach  # noqa: E402
from entropy_probe.probe import EntropyProbe  # noqa: E402

GROUP = 8
SEQUENCE_SE = 3.3e-3  # the sequence arm's median se_cond_e (bench_trainer_after.json: E = 4 units x 8)
TOKEN = {"entropy": "token"}
BACKWARD = {"engine": "backward"}  # the engine of the records before issue 24's third pass, named
SIZED = {"se_target": SEQUENCE_SE}
ARMS = {  # name: (held-out prompts, ProbeConfig fields, callback keyword arguments) or None for no callback
    "off": None,
    "sequence, E = train batch": (4, {"entropy": "sequence", **BACKWARD}, {}),
    "token, se_target": (4, {**TOKEN, **BACKWARD}, SIZED),
    "token, se_target, jvp": (4, {**TOKEN, "engine": "jvp"}, SIZED),
    "token, se_target, every 4": (4, {**TOKEN, **BACKWARD}, {**SIZED, "every": 4}),
    "token, se_target, jvp, every 4": (4, {**TOKEN, "engine": "jvp"}, {**SIZED, "every": 4}),
    "token, se_target, second order": (4, {**TOKEN, "second_order": True, "by_group": False}, SIZED),
    "token, se_target, lookahead": (4, {**TOKEN, **BACKWARD, "lookahead": "always"}, SIZED),
    "sequence, second order": (4, {"entropy": "sequence", "second_order": True, **BACKWARD}, {}),
}


class PartTimer:
    """Process time spent in the callback's three parts, summed over a run (wraps the functions the
    callback calls; restored on exit)."""

    PARTS = {
        "sampling E": (trl_integration, "sample_rollouts"),
        "run (E pass + statistics)": (EntropyProbe, "run"),
        "measure_change": (EntropyProbe, "measure_change"),
    }

    def __init__(self):
        self.seconds = {part: 0.0 for part in self.PARTS}

    @contextlib.contextmanager
    def installed(self):
        saved = {part: getattr(owner, name) for part, (owner, name) in self.PARTS.items()}
        try:
            for part, (owner, name) in self.PARTS.items():
                setattr(owner, name, self._timed(part, saved[part]))
            yield self
        finally:
            for part, (owner, name) in self.PARTS.items():
                setattr(owner, name, saved[part])

    def _timed(self, part, fn):
        def wrapper(*args, **kwargs):
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.process_time() - t0

        return wrapper


def one_run(arm: str, steps: int, seed: int) -> dict:
    """One training run of ``steps`` optimizer steps; timings, the probe's split and its records."""
    from datasets import Dataset
    from trl import GRPOTrainer

    tokenizer = trl_grpo.build_tokenizer()
    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(
            model=trl_grpo.build_model(tokenizer),
            reward_funcs=trl_grpo.reward_a,
            args=trl_grpo.grpo_args(Path(out), steps, seed=seed),
            train_dataset=Dataset.from_dict({"prompt": trl_grpo.prompts(256, seed=1)}),
            processing_class=tokenizer,
        )
        callback = None
        if ARMS[arm] is not None:
            n_prompts, fields, options = ARMS[arm]
            callback = attach(
                trainer,
                EntropyProbeCallback(
                    trl_grpo.prompts(n_prompts, seed=2),
                    group_size=GROUP,
                    max_new_tokens=8,
                    config=ProbeConfig(direction="optimizer-step", **fields),
                    **{"every": 1, "max_eval_units": n_prompts, **options},
                ),
            )
        parts = PartTimer()
        with parts.installed():
            wall0, cpu0 = time.perf_counter(), time.process_time()
            trainer.train()
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    records = [] if callback is None else callback.records
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "parts_cpu_s": parts.seconds if callback is not None else None,
        "se_cond_e": [r["se_cond_e"] for r in records],
        "n_eval_units": [r.get("n_eval_units") for r in records],
        "delta_h1": [r["delta_h1"] for r in records],
        "se_delta_h2": [r.get("se_delta_h2") for r in records],
        "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    off = runs["off"]
    out = {}
    for arm, rs in runs.items():
        row = {  # absolute seconds stay in the runs: the summary holds the ratios the docs quote
            "cpu_ratio_to_off": spread([r["cpu_s"] / o["cpu_s"] for r, o in zip(rs, off)]),
            # the wall clock of a shared machine: its median only (its spread is the other jobs')
            "wall_ratio_to_off": {
                "median": statistics.median(r["wall_s"] / o["wall_s"] for r, o in zip(rs, off))
            },
            "same_trajectory_as_off": all(r["loss"] == o["loss"] for r, o in zip(rs, off)),
        }
        if rs[0]["parts_cpu_s"] is not None:
            probe_total = [sum(r["parts_cpu_s"].values()) for r in rs]
            row["probe_over_off_cpu"] = statistics.median(t / o["cpu_s"] for t, o in zip(probe_total, off))
            sampling = [r["parts_cpu_s"]["sampling E"] for r in rs]
            row["sampling_over_off_cpu"] = spread([t / o["cpu_s"] for t, o in zip(sampling, off)])
            steps = len(rs[0]["se_cond_e"])
            row["probe_ms_per_probed_step"] = statistics.median(1e3 * t / steps for t in probe_total)
            row["off_ms_per_step"] = statistics.median(1e3 * o["cpu_s"] / len(o["loss"]) for o in off)
            row["split"] = {
                part: spread([r["parts_cpu_s"][part] / t for r, t in zip(rs, probe_total)])
                for part in PartTimer.PARTS
            }
            row["se_cond_e"] = spread([s for r in rs for s in r["se_cond_e"]])
            row["n_eval_units"] = spread([n for r in rs for n in r["n_eval_units"]])
            row["probed_steps"] = len(rs[0]["se_cond_e"])
        out[arm] = row
    return out


def resummarise(path: Path) -> None:
    """Recompute a record's per-arm summary from its runs (the summary's fields changed, the runs not)."""
    record = json.loads(path.read_text())
    record["arms"] = summarise(record["runs"])
    path.write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--name", default="bench_trainer.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    arms = ["off", *[a for a in args.arms if a != "off"]]
    one_run("off", 1, args.seed)  # warm-up: imports, first-call allocations
    runs = {arm: [] for arm in arms}
    for r in range(args.repeats):
        for arm in arms:
            runs[arm].append(one_run(arm, args.steps, args.seed))
            print(f"round {r} {arm}: {runs[arm][-1]['cpu_s']:.2f} s CPU", flush=True)
    result = summarise(runs)
    for arm, row in result.items():
        cpu, wall = row["cpu_ratio_to_off"]["median"], row["wall_ratio_to_off"]["median"]
        line = f"{arm:34s} CPU x{cpu:.2f} wall x{wall:.2f}"
        if "split" in row:
            line += " | " + ", ".join(f"{p} {s['median']:.0%}" for p, s in row["split"].items())
            line += f" | se_cond_e {row['se_cond_e']['median']:.2e} | units {row['n_eval_units']['median']}"
        print(line)
    write_bench_json(
        args.out, args.name, {"arms": result, "runs": runs}, steps=args.steps, repeats=args.repeats
    )


if __name__ == "__main__":
    main()
