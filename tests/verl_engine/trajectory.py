"""Short verl training runs with and without the probe, on 1 process or on ranks under ``torchrun``.

A run builds verl's FSDP2 engine from the same tiny Qwen2 (seeded), takes ``STEPS`` actor updates on the
same GRPO batches (rank r of W trains on its contiguous share of rows, as verl's dispatch splits a
batch) and returns what the tests compare: the full parameters and AdamW state after the run, the CPU
RNG state, the engine's returned metrics and the probe's records. The runs:

- ``plain``: no probe;
- ``sampled``: E sampled on-policy from held-out prompts by the FSDP2 model at every step
  (``HeldOutPrompts``; ``synced_gpus`` on 2 ranks);
- ``given``: E handed in (a fixed verl ``DataProto`` converted by ``dataproto_to_rollout_batch``, each
  rank its share), probed every second step: the same E whatever the number of ranks;
- ``guarded``: as ``sampled``, with an ``EntropyGuard`` scaling each probed step.

Under torchrun: ``python -m torch.distributed.run --nproc_per_node 2 trajectory.py MODEL_DIR OUT`` writes
rank 0's results of every run to OUT (``torch.save``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from verl.utils.metric.utils import reduce_metrics
from verl_support import (
    EOS,
    PAD,
    TEMPERATURE,
    actor_loss,
    build_engine,
    init_gloo,
    rollout_dataproto,
    train_step,
)

import entropy_probe as ep
from entropy_probe.integrations.verl import HeldOutPrompts, attach, dataproto_to_rollout_batch
from entropy_probe.result import PREFIX

STEPS = 5
TRAIN_PROMPTS = [
    [3, 4, 5],
    [6, 7],
    [8, 9, 10, 11],
    [12, 13],
]  # x 4 responses: 16 rows, 2 micro-batches a rank
EVAL_PROMPTS = [
    [14, 15],
    [16, 17, 18],
    [19, 20],
    [21, 22, 23],
    [24, 25],
    [26, 27, 28],
    [29, 30],
    [31, 32, 33],
]
GROUP, RESPONSE = 4, 6
RUNS = ("plain", "sampled", "given", "guarded")


def share(data, rank: int, world: int):
    """Rank ``rank``'s contiguous rows of a DataProto (verl's ``DataProto.chunk``)."""
    return data.chunk(world)[rank]


def eval_source(kind: str, rank: int, world: int):
    if kind in ("sampled", "guarded"):
        return HeldOutPrompts(EVAL_PROMPTS, GROUP, RESPONSE, eos_token_id=EOS, pad_token_id=PAD, seed=7)
    fixed = dataproto_to_rollout_batch(
        share(rollout_dataproto(EVAL_PROMPTS, GROUP, RESPONSE, 99), rank, world)
    )
    return lambda step: fixed


def full_state(engine) -> list[torch.Tensor]:
    """Every parameter and AdamW state tensor, gathered whole (a collective: all ranks call it)."""
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    out = [whole(p.detach()).clone() for p in engine.module.parameters()]
    for st in engine.optimizer.state.values():
        out += [whole(x).clone() for x in st.values()]
    return out


def run(kind: str, model_dir: Path) -> dict:
    rank, world = init_gloo()
    torch.manual_seed(0)
    engine = build_engine(model_dir)
    loss = actor_loss(engine)
    probe = None
    if kind != "plain":
        # "sequence": run on the token default (2026-12-06), the first-order forecast missed the measured
        # change by a pooled z of -9.6: the token SE is several times smaller and these steps are large
        # (predicted ESS 0.70-0.82, flagged unreliable), so the Taylor remainder shows. Comparing the
        # prediction (lookahead on flagged steps) instead is left for later (noted when issue 19 closed).
        config = ep.ProbeConfig(direction="optimizer-step", temperature=TEMPERATURE, entropy="sequence")
        guard = ep.EntropyGuard(max_drop=1e-3) if kind == "guarded" else None
        every = 2 if kind == "given" else 1
        probe = attach(engine, eval_source(kind, rank, world), every=every, config=config, guard=guard)
    metrics, lrs = [], []
    for step in range(STEPS):
        data = share(rollout_dataproto(TRAIN_PROMPTS, GROUP, RESPONSE, seed=100 + step), rank, world)
        out = train_step(engine, data, loss)
        mine = {k: v for k, v in out["metrics"].items() if k.startswith(PREFIX)}
        kinds = {type(v).__name__ for v in mine.values()}
        metrics.append({"types": kinds, **reduce_metrics(mine)})  # verl's own reduction, as its trainer logs
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
    result = {
        "state": full_state(engine),
        "rng": torch.get_rng_state(),
        "metrics": metrics,
        "lrs": lrs,
        "records": None if probe is None else probe.records,
        "world": world,
    }
    if probe is not None:
        probe.detach()
    return result


def main(model_dir: str, out: str) -> None:
    results = {kind: run(kind, Path(model_dir)) for kind in RUNS}
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
