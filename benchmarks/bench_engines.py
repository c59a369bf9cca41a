"""Benchmark the probe's engines for the s_n against a training step and against the founding note's loop.

Run (one command; CPU unless a GPU is present, a few minutes on 2 CPU cores):

    make bench
    PYTHONPATH=src python benchmarks/bench_engines.py [--device cuda] [--quick] [--out runs/bench]

What it measures, every figure a ratio of timings taken in this process (fastest of --repeats
interleaved rounds after a warm-up round; on CPU with one thread the clock is the process's CPU time,
so that other processes on a shared machine do not distort it; on CUDA the wall clock):

1. per model size (tiny / small / medium, built from config, G = 8 responses per prompt):
   the probe's E pass (delta_h1 + SE over E: every s_n, then the statistics) of each engine
   divided by one training forward+backward over the same E (microbatched, ``loss.backward()``);
   each engine's speed-up over the note's loop (one backward per unit, one ``.item()`` per
   parameter, written out literally below as ``note_loop``);
2. peak extra memory of each: on CUDA ``torch.cuda.max_memory_allocated`` above the memory held
   before the call; on CPU the process's resident-set high-water mark (Linux ``VmHWM``, reset
   through ``/proc/self/clear_refs`` before the call) above the resident set before the call;
3. time per unit as B_E grows from 8 to 128 units, per engine, on the tiny and small models;
4. the issue's targets, hit or missed, with the numbers.

Tables are printed with rich; everything is also written to ``<out>/bench_engines_<device>.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout, installed or not

from entropy_probe.batch import RolloutBatch  # noqa: E402
from entropy_probe.config import ProbeConfig  # noqa: E402
from entropy_probe.engines import eval_projections  # noqa: E402
from entropy_probe.logprobs import sequence_logprobs  # noqa: E402
from entropy_probe.objectives import UpdateTotals, advantages, policy_gradient_coefficients  # noqa: E402
from entropy_probe.statistics import conditional_variance, moments_update  # noqa: E402

GROUP = 8  # responses per prompt (G)
WEIGHTING, ESTIMATOR = "token-mean", "seed"  # "seed": the note's L_X, so the note's loop gives the same s_n
LR = 1e-6


# ---- models and batches -------------------------------------------------------------------------
@dataclass
class Size:
    name: str
    arch: str
    layers: int
    hidden: int
    vocab: int
    prompt_len: int
    response_len: int


CPU_SIZES = [
    Size("tiny", "gpt2", layers=2, hidden=64, vocab=512, prompt_len=8, response_len=16),
    Size("small", "gpt2", layers=4, hidden=128, vocab=2048, prompt_len=8, response_len=24),
    Size("medium", "llama", layers=4, hidden=256, vocab=4096, prompt_len=16, response_len=32),
]
GPU_SIZES = [
    Size("tiny", "gpt2", layers=2, hidden=128, vocab=4096, prompt_len=32, response_len=64),
    Size("small", "llama", layers=8, hidden=512, vocab=32000, prompt_len=64, response_len=192),
    Size("medium", "llama", layers=16, hidden=1024, vocab=32000, prompt_len=128, response_len=384),
]


def build_model(size: Size, device: str) -> torch.nn.Module:
    """An HF causal LM from config (no download), dropout off so train and eval forwards cost the same."""
    torch.manual_seed(0)
    if size.arch == "gpt2":
        cfg = GPT2Config(
            n_layer=size.layers,
            n_embd=size.hidden,
            n_head=max(size.hidden // 64, 2),
            vocab_size=size.vocab,
            n_positions=size.prompt_len + size.response_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            num_hidden_layers=size.layers,
            hidden_size=size.hidden,
            intermediate_size=size.hidden * 8 // 3,
            num_attention_heads=max(size.hidden // 64, 2),
            num_key_value_heads=max(size.hidden // 128, 1),
            vocab_size=size.vocab,
            max_position_embeddings=size.prompt_len + size.response_len,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(cfg)
    return model.to(device).eval()


def rollout_batch(size: Size, n_units: int, seed: int, device: str) -> RolloutBatch:
    """B_E units of G responses, left-padded like a generation batch, response lengths 25-100% of the max."""
    gen = torch.Generator().manual_seed(seed)
    n, width = n_units * GROUP, size.prompt_len + size.response_len
    lengths = torch.randint(max(size.response_len // 4, 1), size.response_len + 1, (n,), generator=gen)
    ids = torch.randint(1, size.vocab, (n, width), generator=gen)
    pos = torch.arange(width)  # (T,)
    start = (size.response_len - lengths)[:, None]  # (N, 1): left padding before the prompt
    attn = (pos[None] >= start).long()  # (N, T)
    resp = (pos[None] >= start + size.prompt_len).long()  # (N, T)
    groups = torch.arange(n_units).repeat_interleave(GROUP)
    batch = RolloutBatch(ids * attn, attn, resp, groups, rewards=torch.rand(n, generator=gen))
    return batch.to(device)


def parameters_of(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def random_direction(params) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {n: torch.randn(p.shape, generator=gen).to(p.device) * 1e-3 for n, p in params.items()}


# ---- what is timed ------------------------------------------------------------------------------
def training_step(model, params, batch: RolloutBatch, microbatch_units: int) -> None:
    """One training forward+backward over the batch (GRPO surrogate, grads accumulated into .grad)."""
    coeff = policy_gradient_coefficients(
        batch, advantages(batch, "grpo"), "seq-mean-token-mean", UpdateTotals.of(batch)
    )
    for mb in batch.microbatches(microbatch_units):
        loss = -(coeff[mb.rows] * sequence_logprobs(model, mb.batch, 1.0, WEIGHTING).seq).sum()
        loss.backward()
    model.zero_grad(set_to_none=True)


def note_loop(model, params, batch: RolloutBatch, muY: dict) -> torch.Tensor:
    """The founding note's ``compute_SE_over_E_only`` loop, literally: one backward per unit into
    ``.grad``, then ``s_n += (p.grad * muY[p]).sum().item()`` for every parameter."""
    s = []
    for unit in range(batch.n_units):
        model.zero_grad(set_to_none=True)
        sub = batch.select_units([unit])
        lp = sequence_logprobs(model, sub, 1.0, WEIGHTING)
        sw = lp.weighted.detach()
        sw_loo = (sw.sum() - sw) / (len(sw) - 1)  # S_w^LOO: mean of the other responses
        coeff = (sw - sw_loo).detach()
        L_X = -(coeff * lp.seq).mean()
        L_X.backward()
        s_n = 0.0
        for name, p in model.named_parameters():
            if p.grad is not None:
                s_n += (p.grad * muY[name]).sum().item()
        s.append(s_n)
        model.zero_grad(set_to_none=True)
    return torch.tensor(s)


def probe_e_pass(engine: str, microbatch_units: int):
    """delta_h1 + SE over E with one engine: every s_n, then the moments."""

    def run(model, params, batch, v):
        cfg = ProbeConfig(
            engine=engine,
            microbatch_units=microbatch_units,
            entropy_weighting=WEIGHTING,
            x_estimator=ESTIMATOR,
            by_group=False,  # the engine alone, not the backward engine's attribution by group
        )
        proj = eval_projections(model, params, batch, v, cfg)
        conditional_variance(moments_update(proj.s), LR)
        return proj.s

    return run


# ---- clocks and memory --------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = {"fn": time.perf_counter, "name": "wall clock (time.perf_counter)"}


def use_cpu_time() -> None:
    """Time by this process's CPU time: with one torch thread every op runs on the calling thread, so
    the figure is the compute itself, and other processes on a shared machine do not add to it."""
    CLOCK.update(fn=time.process_time, name="process CPU time (time.process_time), 1 torch thread")


def timed(fns: dict, device: str, repeats: int, warmup: bool = True) -> dict:
    """Fastest seconds of each ``fn()`` over ``repeats`` rounds, after one warm-up round.

    The contenders run interleaved, round after round, and the minimum is kept: interference only
    ever adds time, and it then falls on every contender alike.
    """
    if warmup:
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    clock = CLOCK["fn"]
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            t0 = clock()
            fn()
            synchronize(device)
            best[name] = min(best[name], clock() - t0)
    return best


def _proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_extra_mib(fn, device: str) -> float:
    """Peak memory of ``fn()`` above what was held before it, in MiB (see the module docstring)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the resident set is what is live
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _proc_kib("VmRSS")
    fn()
    return (_proc_kib("VmHWM") - before) / 1024


# ---- the benchmark ------------------------------------------------------------------------------
ENGINES = ("note-loop", "backward", "jvp")


def contenders(model, params, batch, v, microbatch_units):
    """name -> zero-argument callable for the training step and every engine on this batch."""
    jvp, backward = probe_e_pass("jvp", microbatch_units), probe_e_pass("backward", microbatch_units)
    jvp_one = probe_e_pass("jvp", 1)  # one unit per pass: the backward engine's granularity
    return {
        "train fwd+bwd": lambda: training_step(model, params, batch, microbatch_units),
        "note-loop": lambda: note_loop(model, params, batch, v),
        "backward": lambda: backward(model, params, batch, v),
        "jvp": lambda: jvp(model, params, batch, v),
        "jvp-1": lambda: jvp_one(model, params, batch, v),
    }


def check_same_s(model, params, batch, v, microbatch_units) -> dict:
    """Max-norm relative difference of the note's loop and of the jvp engine to the backward engine's s_n."""
    ref = probe_e_pass("backward", microbatch_units)(model, params, batch, v).cpu()
    others = {
        "note-loop": note_loop(model, params, batch, v).to(torch.float32),
        "jvp": probe_e_pass("jvp", microbatch_units)(model, params, batch, v).cpu(),
    }
    return {name: float((s - ref).abs().max() / ref.abs().max()) for name, s in others.items()}


def bench_size(size: Size, args, console: Console) -> dict:
    model = build_model(size, args.device)
    params = parameters_of(model)
    v = random_direction(params)
    n_params = sum(p.numel() for p in params.values())
    batch = rollout_batch(size, args.units, seed=2, device=args.device)
    agree = check_same_s(model, params, batch, v, args.microbatch_units)
    fns = contenders(model, params, batch, v, args.microbatch_units)
    seconds = timed(fns, args.device, args.repeats)
    memory = {name: peak_extra_mib(fn, args.device) for name, fn in fns.items()}
    console.log(
        f"{size.name}: {n_params / 1e6:.2f}M parameters, B_E={args.units}, "
        f"s_n vs backward: note loop {agree['note-loop']:.1e}, jvp {agree['jvp']:.1e}; "
        + ", ".join(f"{k} {t:.3f}s" for k, t in seconds.items())
    )
    scaling = {}
    if size.name in args.scaling_sizes:
        for units in args.scaling_units:
            big = rollout_batch(size, units, seed=3, device=args.device)
            per = {
                name: fn
                for name, fn in contenders(model, params, big, v, args.microbatch_units).items()
                if name in ENGINES
            }
            # warm already (the same shapes ran above); two rounds keep the largest B_E affordable on CPU
            scaling[units] = {name: t / units for name, t in timed(per, args.device, 2, warmup=False).items()}
            console.log(
                f"{size.name} B_E={units}: "
                + ", ".join(f"{k} {t * 1e3:.2f} ms/unit" for k, t in scaling[units].items())
            )
    return dict(
        size=size.__dict__,
        n_params=n_params,
        units=args.units,
        group=GROUP,
        seconds=seconds,
        peak_extra_mib=memory,
        s_max_rel_diff=agree,
        seconds_per_unit=scaling,
    )


# ---- report -------------------------------------------------------------------------------------
PROBES = (
    "backward",
    "jvp",
    "jvp-1",
)  # the engines the probe can run (jvp-1: the jvp engine, one unit per pass)
LABEL = {
    "train fwd+bwd": "train fwd+bwd",
    "note-loop": "note loop",
    "backward": "backward",
    "jvp": "jvp",
    "jvp-1": "jvp, 1 unit/pass",
}


def time_table(results, microbatch_units: int) -> Table:
    t = Table(
        title=f"Seconds per pass over E (fastest of the rounds; {microbatch_units} units per pass for "
        "jvp and training)"
    )
    for col in ("model", "params", "B_E x G", *(LABEL[k] for k in ("train fwd+bwd", "note-loop") + PROBES)):
        t.add_column(col, justify="right")
    for r in results:
        s = r["seconds"]
        t.add_row(
            r["size"]["name"],
            f"{r['n_params'] / 1e6:.2f}M",
            f"{r['units']} x {r['group']}",
            *(f"{s[k]:.3f}" for k in ("train fwd+bwd", "note-loop") + PROBES),
        )
    return t


def ratio_table(results) -> Table:
    t = Table(
        title="E pass (delta_h1 + SE over E) / one training forward+backward over the same E, and "
        "speed-up over the note's loop"
    )
    for col in ("model", *(f"{k} / train" for k in PROBES), *(f"note loop / {k}" for k in PROBES)):
        t.add_column(col, justify="right")
    for r in results:
        s = r["seconds"]
        t.add_row(
            r["size"]["name"],
            *(f"{s[k] / s['train fwd+bwd']:.2f}" for k in PROBES),
            *(f"{s['note-loop'] / s[k]:.2f}x" for k in PROBES),
        )
    return t


def memory_table(results, how: str) -> Table:
    t = Table(title=f"Peak extra memory, MiB ({how})")
    for col in (
        "model",
        *(LABEL[k] for k in ("train fwd+bwd", "note-loop") + PROBES),
        "jvp / backward",
        "jvp-1 / backward",
    ):
        t.add_column(col, justify="right")
    for r in results:
        m = r["peak_extra_mib"]
        t.add_row(
            r["size"]["name"],
            *(f"{m[k]:.1f}" for k in ("train fwd+bwd", "note-loop") + PROBES),
            *(f"{m[k] / max(m['backward'], 1e-9):.2f}" for k in ("jvp", "jvp-1")),
        )
    return t


def scaling_table(results) -> Table:
    t = Table(title="Time per unit (ms) as B_E grows")
    t.add_column("model")
    t.add_column("engine")
    units = sorted({u for r in results for u in r["seconds_per_unit"]})
    for u in units:
        t.add_column(f"B_E={u}", justify="right")
    t.add_column("max/min", justify="right")
    for r in results:
        if not r["seconds_per_unit"]:
            continue
        for engine in ENGINES:
            per = [r["seconds_per_unit"][u][engine] for u in units]
            t.add_row(
                r["size"]["name"], engine, *(f"{x * 1e3:.2f}" for x in per), f"{max(per) / min(per):.2f}"
            )
    return t


def targets(results, device: str) -> list[dict]:
    """The issue's targets, hit or missed, per model and engine."""
    out = []
    need = 2.0 if device.startswith("cuda") else 1.0
    for r in results:
        s, m, name = r["seconds"], r["peak_extra_mib"], r["size"]["name"]
        for engine in PROBES:
            ratio = s[engine] / s["train fwd+bwd"]
            out.append(
                dict(
                    model=name,
                    target=f"{engine}: E pass <= 0.8x train fwd+bwd",
                    value=ratio,
                    hit=ratio <= 0.8,
                )
            )
            speedup = s["note-loop"] / s[engine]
            out.append(
                dict(
                    model=name,
                    target=f"{engine}: >= {need:g}x as fast as the note's loop",
                    value=speedup,
                    hit=speedup >= need,
                )
            )
        for engine in ("jvp", "jvp-1"):
            frac = m[engine] / max(m["backward"], 1e-9)
            out.append(
                dict(
                    model=name,
                    target=f"{engine}: peak extra memory <= 0.5x the backward engine's",
                    value=frac,
                    hit=frac <= 0.5,
                )
            )
        if r["seconds_per_unit"]:
            for engine in ("backward", "jvp"):
                per = [r["seconds_per_unit"][u][engine] for u in sorted(r["seconds_per_unit"])]
                spread = max(per) / min(per)
                out.append(
                    dict(
                        model=name,
                        target=f"{engine}: time per unit flat within 10% (max/min)",
                        value=spread,
                        hit=spread <= 1.10,
                    )
                )
    return out


def targets_table(rows) -> Table:
    t = Table(title="Targets (issue 6)")
    for col in ("model", "target", "measured", "hit"):
        t.add_column(col)
    for row in rows:
        t.add_row(
            row["model"], row["target"], f"{row['value']:.2f}", "[green]hit" if row["hit"] else "[red]miss"
        )
    return t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--units", type=int, default=16, help="B_E of the ratio and memory tables")
    p.add_argument(
        "--microbatch-units", type=int, default=4, help="units per pass: jvp engine and training step"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scaling-units", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--scaling-sizes", nargs="*", default=["tiny", "small"])
    p.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, B_E up to 16, one repeat")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: steadier timings on a shared machine; ignored on CUDA)",
    )
    p.add_argument("--out", default="runs/bench")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.scaling_sizes, args.scaling_units, args.repeats, args.units = (
            ["tiny"],
            ["tiny"],
            [8, 16],
            1,
            8,
        )
    console = Console(width=150)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
        if args.threads == 1:
            use_cpu_time()
    on_cuda = args.device.startswith("cuda")
    device_name = (
        torch.cuda.get_device_name(args.device)
        if on_cuda
        else f"{platform.processor() or platform.machine()} CPU"
    )
    how = "torch.cuda.max_memory_allocated" if on_cuda else "CPU resident-set high-water mark (VmHWM)"
    console.log(
        f"device {device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, G={GROUP}, "
        f"clock: {CLOCK['name']}"
    )
    sizes = [s for s in (GPU_SIZES if on_cuda else CPU_SIZES) if s.name in args.sizes]
    results = [bench_size(size, args, console) for size in sizes]
    console.print(time_table(results, args.microbatch_units))
    console.print(ratio_table(results))
    console.print(memory_table(results, how))
    if any(r["seconds_per_unit"] for r in results):
        console.print(scaling_table(results))
    rows = targets(results, args.device)
    console.print(targets_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_engines_{'cuda' if on_cuda else 'cpu'}.json"
    path.write_text(
        json.dumps(
            dict(
                device=device_name,
                torch=torch.__version__,
                threads=torch.get_num_threads(),
                memory_measure=how,
                clock=CLOCK["name"],
                microbatch_units=args.microbatch_units,
                results=results,
                targets=rows,
            ),
            indent=1,
        )
    )
    console.log(f"wrote {path}")


if __name__ == "__main__":
    main()
