"""What the trainer integration costs: ``run(eval_batch=E, from_grad=True)`` + ``measure_change`` against
one training step on a batch of the same size (DESIGN section 25: at most 1.3x on the medium model, 2x on
the tiny one).

    PYTHONPATH=src python benchmarks/bench_from_grad.py [--sizes tiny medium] [--units 16] [--repeats 7]
    PYTHONPATH=src python benchmarks/bench_from_grad.py --sizes tiny --profile 20   # + where the time goes

CPU, one torch thread, process CPU time; every contender runs once to warm up, then all run interleaved
for ``--repeats`` rounds. Reported: the median seconds with min and max over the rounds, and the median
of the per-round ratios to the training step of the same round (paired, so that a busy moment on the
shared machine falls on both). Contenders, B units x G = 8 responses each (the models of
benchmarks/bench_engines.py):

- **training step**: forward+backward of the GRPO surrogate over U in microbatches of 4 units,
  ``clip_grad_norm_``, ``AdamW.step()``, ``zero_grad()``;
- **probe, <engine> engine**: ``probe.run(eval_batch=E, from_grad=True)`` (v from the ``.grad`` a
  backward left, the s_n over E, the statistics) plus ``probe.measure_change(result)`` (one forward over
  E), with ``direction="optimizer-step"`` and a warm AdamW (one real step taken before);
- **probe, backward engine, step formed whole**: the backward engine with ``step_in_hook=False`` (each
  parameter's step formed once and kept, instead of formed again in the hook for every E unit).

``--sequence``: also each engine on ``entropy="sequence"``. ``--floors``: also the parts and the least
arithmetic of any E pass (``floor_contenders``).
``--profile N``: the probe call (backward engine) under cProfile, N calls; the JSON gets the functions
with the largest own and cumulative times per call. Writes ``<out>/bench_from_grad.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_engines import CLOCK, CPU_SIZES, GROUP, build_model, rollout_batch, use_cpu_time  # noqa: E402
from bench_json import write_bench_json  # noqa: E402

import entropy_probe as ep  # noqa: E402
from entropy_probe.logprobs import sequence_logprobs, token_terms  # noqa: E402
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


def warm_optimizer(model, update) -> torch.optim.AdamW:
    """An AdamW with state (one real step), and a fresh ``.grad`` left for the probe to read."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    surrogate_backward(model, update)
    opt.step()
    opt.zero_grad(set_to_none=True)
    surrogate_backward(model, update)  # the .grad the probe reads (the trainer's, left in place)
    return opt


def contenders(size, units: int, engines, floors: bool = False, sequence: bool = False) -> dict:
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
    variants = [(f"probe, {engine} engine", {"engine": engine}) for engine in engines]
    variants.append(
        ("probe, backward engine, step formed whole", {"step_in_hook": False, "engine": "backward"})
    )
    if sequence:
        variants += [(f"probe, {e} engine, sequence", {"engine": e, "entropy": "sequence"}) for e in engines]
    for name, fields in variants:
        probed = build_model(size, "cpu")
        opt = warm_optimizer(probed, update)
        probe = ep.EntropyProbe(probed, opt, ep.ProbeConfig(direction="optimizer-step", **fields))

        def probe_call(probe=probe):
            probe.measure_change(probe.run(eval_batch=evaluation, from_grad=True))

        out[name] = probe_call
    if floors:
        out.update(floor_contenders(size, update, evaluation))
    return out


def floor_contenders(size, update, evaluation) -> dict:
    """What bounds the probe from below (``--floors``): its two parts timed alone, and the least arithmetic
    any first-order pass over E needs.

    - **run alone, jvp engine** and **measure_change alone** (on a result made before the rounds; it
      measures and changes nothing);
    - **entropy gradient over E, once**: one forward and one backward of the pooled token-level entropy
      surrogate over all of E in microbatches of 4 units, into no ``.grad`` (one derivative for the whole
      E, no per-unit values): the arithmetic floor of an E pass, whichever engine.
    """
    probed = build_model(size, "cpu")
    opt = warm_optimizer(probed, update)
    probe = ep.EntropyProbe(probed, opt, ep.ProbeConfig(direction="optimizer-step", engine="jvp"))
    kept = probe.run(eval_batch=evaluation, from_grad=True)
    params = [p for p in probed.parameters() if p.requires_grad]

    def entropy_gradient_once():
        for mb in evaluation.microbatches(4):
            t = token_terms(probed, mb.batch, 1.0)
            torch.autograd.grad((t.entropy * t.mask).sum() / t.mask.sum(), params, allow_unused=True)

    return {
        "run alone, jvp engine": lambda: probe.run(eval_batch=evaluation, from_grad=True),
        "measure_change alone": lambda: probe.measure_change(kept),
        "entropy gradient over E, once": entropy_gradient_once,
    }


def rounds(fns: dict, repeats: int) -> dict:
    """Seconds of each ``fn()`` in every round (after one warm-up round), contenders interleaved."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    clock = CLOCK["fn"]
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return times


def summary(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}


def profile(fn, calls: int, top: int = 25) -> dict:
    """cProfile of ``calls`` calls of ``fn``: the top functions by own time and by cumulative time,
    in seconds per call (cProfile's own overhead inflates Python-heavy code: read it as a split)."""
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    st = pstats.Stats(prof)
    rows = [
        {
            "function": f"{Path(file).name}:{line}:{name}",
            "probe_code": "entropy_probe" in file,
            "ncalls_per_call": nc / calls,
            "own_s": tt / calls,
            "cumulative_s": ct / calls,
        }
        for (file, line, name), (_, nc, tt, ct, _) in st.stats.items()
    ]
    return {
        "calls": calls,
        "clock": "cProfile's default timer (wall clock)",
        "by_own_time": sorted(rows, key=lambda r: -r["own_s"])[:top],
        "by_cumulative_time": sorted(rows, key=lambda r: -r["cumulative_s"])[:top],
        "probe_functions": sorted([r for r in rows if r["probe_code"]], key=lambda r: -r["cumulative_s"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "medium"])
    parser.add_argument("--engines", nargs="+", default=["backward"])
    parser.add_argument("--units", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--profile", type=int, default=0, help="also profile N probe calls per size")
    parser.add_argument(
        "--floors", action="store_true", help="also time the parts and the floor (floor_contenders)"
    )
    parser.add_argument("--sequence", action="store_true", help='also each engine on entropy="sequence"')
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--name", default="bench_from_grad.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    use_cpu_time()
    rows = []
    for size in [s for s in CPU_SIZES if s.name in args.sizes]:
        fns = contenders(size, args.units, args.engines, args.floors, args.sequence)
        times = rounds(fns, args.repeats)
        train = times["training step"]
        ratios = {
            k: summary([a / b for a, b in zip(t, train)]) for k, t in times.items() if k != "training step"
        }
        row = {
            "size": size.name,
            "units": args.units,
            "group": GROUP,
            "seconds": {k: summary(t) for k, t in times.items()},
            "ratio": ratios,
        }
        if args.profile:
            row["profile"] = profile(fns[f"probe, {args.engines[0]} engine"], args.profile)
        rows.append(row)
        print(
            f"{size.name}: training step {statistics.median(train):.4f} s; "
            + "; ".join(
                f"{k} {row['seconds'][k]['median']:.4f} s = {r['median']:.2f}x "
                f"({r['min']:.2f}-{r['max']:.2f})"
                for k, r in ratios.items()
            ),
            flush=True,
        )
    write_bench_json(args.out, args.name, {"rows": rows}, clock=CLOCK["name"])


if __name__ == "__main__":
    main()
