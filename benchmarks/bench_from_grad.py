"""What the trainer integration costs: ``run(eval_batch=E, from_grad=True)`` + ``measure_change`` against
one training step on a batch of the same size (DESIGN section 11; the issue's target: at most 1.5x).

    PYTHONPATH=src python benchmarks/bench_from_grad.py [--sizes tiny small medium] [--units 16] [--repeats 3]

CPU, one torch thread, process CPU time, fastest of ``--repeats`` interleaved rounds after a warm-up
(the clock and the models of benchmarks/bench_engines.py). Contenders, B units x G = 8 responses each:

- **training step**: forward+backward of the GRPO surrogate over U in microbatches of 4 units,
  ``clip_grad_norm_``, ``AdamW.step()``, ``zero_grad()``;
- **probe, backward engine** / **probe, jvp engine**: ``probe.run(eval_batch=E, from_grad=True)``
  (v from the ``.grad`` a backward left, the s_n over E, the statistics) plus
  ``probe.measure_change(result)`` (one forward over E).

Writes ``<out>/bench_from_grad.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_engines import CPU_SIZES, GROUP, build_model, rollout_batch, timed, use_cpu_time  # noqa: E402

import entropy_probe as ep  # noqa: E402
from entropy_probe.logprobs import sequence_logprobs  # noqa: E402
from entropy_probe.objectives import UpdateTotals, advantages, policy_gradient_coefficients  # noqa: E402


def surrogate_backward(model, batch, microbatch_units: int = 4) -> None:
    """The trainer's backward: the GRPO surrogate over U, gradients accumulated microbatch by microbatch."""
    coeff = policy_gradient_coefficients(
        batch, advantages(batch, "grpo"), "seq-mean-token-mean", UpdateTotals.of(batch)
    )
    for mb in batch.microbatches(microbatch_units):
        (
            -(coeff[mb.rows] * sequence_logprobs(model, mb.batch, 1.0, "token-mean").seq).sum()
            / batch.n_units
        ).backward()


def contenders(size, units: int) -> dict:
    update, evaluation = (
        rollout_batch(size, units, seed=1, device="cpu"),
        rollout_batch(size, units, seed=2, device="cpu"),
    )
    trained = build_model(size, "cpu")
    train_opt = torch.optim.AdamW(trained.parameters(), lr=1e-6)

    def training_step():
        surrogate_backward(trained, update)
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        train_opt.step()
        train_opt.zero_grad(set_to_none=True)

    out = {"training step": training_step}
    for engine in ("backward", "jvp"):
        probed = build_model(size, "cpu")
        opt = torch.optim.AdamW(probed.parameters(), lr=1e-6)
        surrogate_backward(probed, update)  # the .grad the probe reads (the trainer's, left in place)
        probe = ep.EntropyProbe(probed, opt, ep.ProbeConfig(direction="optimizer-step", engine=engine))

        def probe_call(probe=probe):
            probe.measure_change(probe.run(eval_batch=evaluation, from_grad=True))

        out[f"probe, {engine} engine"] = probe_call
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"])
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench")
    args = parser.parse_args()
    torch.set_num_threads(1)
    use_cpu_time()
    rows = []
    for size in [s for s in CPU_SIZES if s.name in args.sizes]:
        best = timed(contenders(size, args.units), "cpu", args.repeats)
        train = best["training step"]
        row = {
            "size": size.name,
            "units": args.units,
            "group": GROUP,
            "seconds": best,
            "ratio": {k: v / train for k, v in best.items() if k != "training step"},
        }
        rows.append(row)
        print(
            f"{size.name}: training step {train:.3f} s; "
            + "; ".join(f"{k} {best[k]:.3f} s = {r:.2f}x" for k, r in row["ratio"].items()),
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "clock": "process CPU time",
    }
    (out / "bench_from_grad.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
