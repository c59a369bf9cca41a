"""The probe's cost on verl's FSDP2 training engine: the same actor updates with and without it.

    PYTHONPATH=src .venv-verl/bin/python benchmarks/bench_verl_trainer.py [--steps 8] [--repeats 5]

The runs of ``tests/verl_engine/trajectory.py`` (verl 0.9.1's ``FSDPEngineWithLMHead`` on one gloo
process, CPU, fp32, a tiny random Qwen2, verl's ``ppo_loss``, 4 prompts x 4 responses per update),
``--steps`` updates each: "plain" (no probe) and "sampled" (``entropy_probe.integrations.verl.attach``
with E sampled on-policy from the 8 held-out prompts x 4 at every update; the trajectory's
``ProbeConfig``, the sequence functional when this was recorded). The arms alternate in one process,
``--repeats`` rounds, each timed by process CPU time and the wall clock inside the ``train_step`` calls
only (the probe runs in the optimizer's step hooks there; the engine's build is not timed). The updates
take fixed rollout batches: verl's rollout (vLLM/SGLang) is not in the timed step, so the ratio is
against the actor update alone (an upper bound of the overhead in a whole verl step).
Writes ``<out>/bench_verl_trainer.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests" / "verl_engine"))
sys.path.insert(0, str(HERE))

import trajectory  # noqa: E402  (verl_support sets 1 torch thread and the CPU platform on import)
import verl_support  # noqa: E402
from bench_json import write_bench_json  # noqa: E402


def one_run(kind: str, model_dir: Path, steps: int) -> dict:
    """One ``trajectory.run``; the time inside its ``train_step`` calls only (the engine's build is not
    timed), where the probe runs (the optimizer's step hooks)."""
    trajectory.STEPS = steps
    spent = {"cpu_s": 0.0, "wall_s": 0.0}
    plain_step = verl_support.train_step

    def timed_step(*args, **kwargs):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        try:
            return plain_step(*args, **kwargs)
        finally:
            spent["wall_s"] += time.perf_counter() - wall0
            spent["cpu_s"] += time.process_time() - cpu0

    trajectory.train_step = timed_step
    try:
        out = trajectory.run(kind, model_dir)
    finally:
        trajectory.train_step = plain_step
    records = out["records"] or []
    return {**spent, "se_cond_e": [r["se_cond_e"] for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--name", default="bench_verl_trainer.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = verl_support.tiny_qwen2(Path(tmp))
        one_run("plain", model_dir, 1)  # warm-up
        runs = {"plain": [], "sampled": []}
        for r in range(args.repeats):
            for kind in runs:
                runs[kind].append(one_run(kind, model_dir, args.steps))
                print(f"round {r} {kind}: {runs[kind][-1]['cpu_s']:.2f} s CPU", flush=True)
    ratio = {t: [s[t] / p[t] for s, p in zip(runs["sampled"], runs["plain"])] for t in ("cpu_s", "wall_s")}
    summary = {
        f"{t}_ratio": {"median": statistics.median(x), "min": min(x), "max": max(x)} for t, x in ratio.items()
    }
    summary["se_cond_e_median"] = statistics.median(s for r in runs["sampled"] for s in r["se_cond_e"])
    print(json.dumps(summary, indent=1))
    write_bench_json(
        args.out, args.name, {"summary": summary, "runs": runs}, steps=args.steps, repeats=args.repeats
    )


if __name__ == "__main__":
    main()
