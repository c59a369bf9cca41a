"""Peak extra memory of one probe call, as a multiple of the fp32 parameter bytes (DESIGN section 17).

    PYTHONPATH=src python benchmarks/bench_memory.py                 # CPU, a few minutes on 1 thread
    PYTHONPATH=src python benchmarks/bench_memory.py --device cuda   # GPU: max_memory_allocated

Model: a GPT-2 built from a config (no download), 8 layers x 512, vocabulary 8192: 29.4M parameters
(117.7 MB in fp32). Batches are small and short (4 units x G = 2, 4 prompt + 8 response tokens), so
that the parameters dominate and activations are a small part of every figure.

Each case runs in a **fresh subprocess**: the model, the batches, the caller's optimizer state and
(for ``direction=v``) the caller's v are made first; then the baseline is taken and the call is
measured. CPU: the resident-set high-water mark (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` after ``malloc_trim``) above the resident set at the baseline; the child
runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that every large tensor is its own mapping, returned
when freed (glibc's adaptive threshold would otherwise keep freed tensors in the heap and blur the
peaks). CUDA: ``torch.cuda.max_memory_allocated`` above ``memory_allocated`` at the baseline.

Cases (peak extra memory / fp32 parameter bytes is the figure of merit):
- ``train fwd+bwd``: the reference, one training forward and backward of one E unit into ``.grad``;
- ``run(E, direction=v)``: the probe along a given v (backward engine; and jvp engine);
- ``run(E, from_grad)``: the trainer integration's call, v from the ``.grad`` a training backward left
  (held by the caller before the baseline, like the optimizer state), each direction ("sgd" with an SGD
  optimizer, the others with AdamW); with the defaults it includes the large-step diagnostic's forward
  at ``theta + eta v / 16``; also with ``lookahead="always"``, with ``truth=True`` and on the model in
  bf16 (still divided by the fp32 parameter bytes); with ``engine="jvp"`` (its tangents read v whole, and
  its exact dS_i replace the diagnostic's forward), at 4 and at 1 unit per pass. Every case without
  ``engine`` in its name runs ``engine="backward"``, the default when these records began;
- ``update_direction(U)``: v alone, for "sgd", "adam-preconditioned" and "optimizer-step";
- ``run(U, E)``: the whole call, each direction, with and without ``se_total``.
Writes ``runs/bench/bench_memory_<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import entropy_probe as ep

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engines import peak_extra_mib  # noqa: E402  (one way to measure peak memory)

LAYERS, WIDTH, VOCAB, HEADS = 8, 512, 8192, 8
PROMPT, RESPONSE, UNITS, GROUP = 4, 8, 4, 2

CASES = {  # name: (call, config fields)
    "train fwd+bwd (1 E unit)": ("train", {}),
    "run(E, direction=v)": ("direction", {}),
    "run(E, direction=v), jvp": ("direction", {"engine": "jvp", "microbatch_units": 1}),
    "run(E, from_grad), optimizer-step": ("from_grad", {"direction": "optimizer-step"}),
    "run(E, from_grad), adam-preconditioned": ("from_grad", {"direction": "adam-preconditioned"}),
    "run(E, from_grad), sgd": ("from_grad", {"direction": "sgd"}),
    "run(E, from_grad), optimizer-step, bf16 model": (
        "from_grad",
        {"direction": "optimizer-step", "bf16": True},
    ),
    "run(E, from_grad), optimizer-step, lookahead always": (
        "from_grad",
        {"direction": "optimizer-step", "lookahead": "always"},
    ),
    "run(E, from_grad), optimizer-step, truth": ("from_grad", {"direction": "optimizer-step", "truth": True}),
    "run(E, from_grad), optimizer-step, step formed whole": (
        "from_grad",
        {"direction": "optimizer-step", "step_in_hook": False},
    ),
    "run(E, from_grad), optimizer-step, jvp": ("from_grad", {"direction": "optimizer-step", "engine": "jvp"}),
    "run(E, from_grad), optimizer-step, jvp, 1 unit per pass": (
        "from_grad",
        {"direction": "optimizer-step", "engine": "jvp", "microbatch_units": 1},
    ),
    "update_direction(U), sgd": ("update_direction", {"direction": "sgd"}),
    "update_direction(U), adam-preconditioned": ("update_direction", {"direction": "adam-preconditioned"}),
    "update_direction(U), optimizer-step": ("update_direction", {"direction": "optimizer-step"}),
    "run(U, E), sgd, no se_total": ("run", {"direction": "sgd", "unconditional_se": False}),
    "run(U, E), adam-preconditioned, no se_total": (
        "run",
        {"direction": "adam-preconditioned", "unconditional_se": False},
    ),
    "run(U, E), optimizer-step, no se_total": (
        "run",
        {"direction": "optimizer-step", "unconditional_se": False},
    ),
    "run(U, E), sgd, no se_total, jvp": (
        "run",
        {"direction": "sgd", "unconditional_se": False, "engine": "jvp"},
    ),
    "run(U, E), sgd, se_total": ("run", {"direction": "sgd"}),
    "run(U, E), adam-preconditioned, se_total": ("run", {"direction": "adam-preconditioned"}),
}


# ---- one case, in a child process -----------------------------------------------------------------
def build(device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=PROMPT + RESPONSE,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=os.environ.get("BENCH_MEMORY_UNTIED") != "1",
    )
    return GPT2LMHeadModel(cfg).to(device)


def batch(seed: int, device: str) -> ep.RolloutBatch:
    gen = torch.Generator().manual_seed(seed)
    n, t = UNITS * GROUP, PROMPT + RESPONSE
    ids = torch.randint(1, VOCAB, (n, t), generator=gen)
    resp = torch.zeros(n, t, dtype=torch.long)
    resp[:, PROMPT:] = 1
    rewards = torch.randint(0, 2, (n,), generator=gen).float()
    return ep.RolloutBatch(
        ids, torch.ones_like(ids), resp, torch.arange(UNITS).repeat_interleave(GROUP), rewards=rewards
    ).to(device)


def child(case: str, device: str) -> dict:
    torch.set_num_threads(1)
    call, fields = CASES[case]
    fields = {"engine": "backward", **fields}  # the engine of the first records; the jvp cases name theirs
    bf16, truth = fields.pop("bf16", False), fields.pop("truth", False)
    model = build(device)
    if bf16:  # the ratio stays against the fp32 parameter bytes (4 bytes per parameter)
        model = model.to(torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    param_bytes = 4 * sum(p.numel() for p in params)
    U, E = batch(1, device), batch(2, device)
    # from_grad with "sgd" forecasts the step of an SGD optimizer (it refuses AdamW's)
    sgd = call == "from_grad" and fields.get("direction") == "sgd"
    opt = (torch.optim.SGD if sgd else torch.optim.AdamW)(model.parameters(), lr=1e-4)
    # The caller's optimizer state exists before the probe is called (one real step).
    logits = model(input_ids=U.input_ids, attention_mask=U.attention_mask).logits
    logits.float().logsumexp(-1).mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    cfg = ep.ProbeConfig(**fields)
    probe = ep.EntropyProbe(model, opt, cfg)
    v = probe.update_direction(U) if call == "direction" else None  # the caller's v, held before the call
    if call == "from_grad":  # the trainer's .grad, held before the call
        out = model(input_ids=U.input_ids, attention_mask=U.attention_mask).logits
        out.float().logsumexp(-1).mean().backward()
    one_unit = E.select_units([0])

    def fn():
        if call == "train":
            out = model(input_ids=one_unit.input_ids, attention_mask=one_unit.attention_mask).logits
            out.logsumexp(-1).mean().backward()
        elif call == "direction":
            probe.run(eval_batch=E, direction=v)
        elif call == "from_grad":
            probe.run(eval_batch=E, from_grad=True, truth=truth)
        elif call == "update_direction":
            probe.update_direction(U)
        else:
            probe.run(U, E)

    start = time.process_time()
    peak = round(peak_extra_mib(fn, device) * 2**20)  # bytes
    return dict(
        case=case,
        peak_bytes=peak,
        param_bytes=param_bytes,
        ratio=peak / param_bytes,
        n_parameters=param_bytes // 4,
        cpu_s=time.process_time() - start,
    )


# ---- the driver ----------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--name", default=None, help="the JSON file's name (default bench_memory_<device>.json)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case here
    p.add_argument(
        "--only", nargs="+", default=None, help="run only the cases whose name contains one of these texts"
    )
    p.add_argument(
        "--untied",
        action="store_true",
        help="untie the LM head from the embeddings (no gradient accumulation of a tied weight)",
    )
    a = p.parse_args(argv)
    if a.case is not None:
        print("RESULT " + json.dumps(child(a.case, a.device)))
        return
    env = dict(
        os.environ,
        MALLOC_MMAP_THRESHOLD_="65536",
        OMP_NUM_THREADS="1",
        BENCH_MEMORY_UNTIED="1" if a.untied else "0",
    )
    rows = []
    for case in CASES:
        if a.only and not any(text in case for text in a.only):
            continue
        out = subprocess.run(
            [sys.executable, __file__, "--case", case, "--device", a.device],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        row = json.loads(out.split("RESULT ", 1)[1])
        rows.append(row)
        print(
            f"{case:48s} peak extra {row['peak_bytes'] / 2**20:8.1f} MiB = {row['ratio']:5.2f} x fp32 params "
            f"({row['n_parameters'] / 1e6:.1f}M)",
            flush=True,
        )
    Path(a.out).mkdir(parents=True, exist_ok=True)
    name = a.name or f"bench_memory_{a.device.split(':')[0]}{'_untied' if a.untied else ''}.json"
    path = Path(a.out) / name
    command = " ".join(["python", *sys.argv])
    path.write_text(
        json.dumps(dict(device=a.device, torch=torch.__version__, command=command, rows=rows), indent=1)
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
