"""``EntropyProbeCallback`` in a real TRL ``GRPOTrainer`` under DDP: 2 spawned ranks, gloo, CPU (accelerate's
MULTI_CPU). Each rank samples its own share of the held-out prompts (``eval_prompts[rank::2]``), the ranks'
probes combine their E units, and every rank reports the same metrics.
Run: ``PYTHONPATH=src pytest -q tests/test_trl_ddp.py`` (about 10 s).
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("trl")

PROMPTS = ["a b c", "d e f", "g h a"]
DEADLINE_S = 150


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from trl_support import grpo_trainer

    from entropy_probe.integrations.trl import EntropyProbeCallback

    class LocalUnits(TrainerCallback):  # this rank's E units, read right after the probe ran
        def __init__(self):
            self.units = []

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.units.append(cb._pending[1].eval_state.batch.n_units)

    # every prompt at every step (the default would be the trainer's 2 prompts per step)
    cb = EntropyProbeCallback(PROMPTS, group_size=3, max_new_tokens=3, max_eval_units=len(PROMPTS))
    local = LocalUnits()
    trainer = grpo_trainer(
        os.path.join(out, "run"), callbacks=[cb, local], steps=2, per_device_train_batch_size=4
    )
    trainer.train()
    assert trainer.accelerator.num_processes == world
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"records": cb.records, "units": local.units}, f)


def test_each_rank_samples_its_share_and_all_report_the_same(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank, args=(2, port, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {DEADLINE_S} s")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["units"] for r in ranks] == [[2, 2], [1, 1]]  # PROMPTS[0::2] and PROMPTS[1::2], at both steps
    assert ranks[0]["records"] == ranks[1]["records"]  # the same bits on every rank
    assert [rec["n_eval_units"] for rec in ranks[0]["records"]] == [3, 3]
    assert any(rec["delta_h1"] != 0 for rec in ranks[0]["records"])
    lines = (tmp_path / "run" / "entropy_probe.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == ranks[0]["records"]  # written once, by the main process
