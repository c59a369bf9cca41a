"""``EntropyProbeCallback(max_eval_units=...)``: how many prompts E holds per probed step, and which.

Default: as many prompts as one optimizer step of the trainer holds (GRPO: completions per step /
``num_generations``), so that a probed step costs about one training step more (docs/performance.md);
the probed steps take consecutive slices of ``eval_prompts`` in turn. Checked in a real TRL
``GRPOTrainer`` (tests/trl_support.py) by decoding the prompts of the E the probe really sampled.
Run: ``PYTHONPATH=src pytest -q tests/test_trl_eval_size.py``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")

from transformers import TrainerCallback
from trl_support import grpo_trainer, word_tokenizer

from entropy_probe import ProbeConfig
from entropy_probe.integrations.eval_size import MIN_UNITS, EvalSize, units_for_se
from entropy_probe.integrations.trl import EntropyProbeCallback, tokenise_prompt, trainer_prompts_per_step

EVAL_PROMPTS = ["a b c", "d e f", "g h a", "b b d", "c c c"]


class EvalPrompts(TrainerCallback):
    """After the probe's callback: the distinct prompts (token ids) of the E it sampled for this step."""

    def __init__(self, probe_cb):
        self.probe_cb, self.steps = probe_cb, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.probe_cb._pending is None:
            return
        batch = self.probe_cb._pending[1].eval_state.batch
        prompts = []
        for row in range(batch.n_sequences):
            keep = batch.attention_mask[row].bool() & ~batch.response_mask[row].bool()
            ids = batch.input_ids[row][keep].tolist()
            if ids not in prompts:
                prompts.append(ids)
        self.steps.append(prompts)


def test_default_e_is_the_trainers_prompts_per_step_and_rotates(tmp_path):
    tok = word_tokenizer()
    cb = EntropyProbeCallback(EVAL_PROMPTS, group_size=2, max_new_tokens=3)
    seen = EvalPrompts(cb)
    trainer = grpo_trainer(tmp_path, callbacks=[cb, seen], steps=3)  # 8 completions / 4 generations
    assert trainer_prompts_per_step(trainer.args) == 2
    trainer.train()
    assert [r["n_eval_units"] for r in cb.records] == [2, 2, 2]
    ids = [tokenise_prompt(tok, p) for p in EVAL_PROMPTS]
    # probed steps 0, 1, 2 take prompts (0, 1), (2, 3), (4, 0): consecutive slices, wrapping around
    assert seen.steps == [[ids[0], ids[1]], [ids[2], ids[3]], [ids[4], ids[0]]]
    assert all(r["se_cond_e"] > 0 for r in cb.records)  # the SE that E size bought, in every record


def test_an_explicit_size_with_every_and_bad_values():
    cb = EntropyProbeCallback(EVAL_PROMPTS[:4], every=2, max_eval_units=3)
    args = SimpleNamespace()  # an explicit size needs nothing from the trainer
    prompts = list(range(4))
    assert [cb._step_prompts(prompts, args, s) for s in (0, 2, 4)] == [[0, 1, 2], [3, 0, 1], [2, 3, 0]]
    capped = EntropyProbeCallback(EVAL_PROMPTS[:2], max_eval_units=10)
    assert capped.eval_units(args) == 2  # never more than the prompts given
    no_groups = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=1)
    assert EntropyProbeCallback(EVAL_PROMPTS).eval_units(no_groups) == len(EVAL_PROMPTS)  # not a GRPO trainer
    grpo = SimpleNamespace(per_device_train_batch_size=8, gradient_accumulation_steps=2, num_generations=4)
    assert EntropyProbeCallback(EVAL_PROMPTS).eval_units(grpo) == 4
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(
            ValueError, match="EntropyProbeCallback.max_eval_units must be None or an integer"
        ):
            EntropyProbeCallback(EVAL_PROMPTS, max_eval_units=bad)


def test_units_for_se_solves_the_se_formula_within_its_bounds():
    # se = lr * sd / sqrt(B): sd 2, lr 0.1 -> B = (0.2 / se)^2
    assert units_for_se(0.05, 0.1, 2.0, cap=64) == 16  # (0.2 / 0.05)^2 exactly
    assert units_for_se(0.06, 0.1, 2.0, cap=64) == 12  # 11.1 rounded up: the SE at 12 is <= 0.06
    assert 0.1 * 2.0 / math.sqrt(12) <= 0.06 < 0.1 * 2.0 / math.sqrt(11)
    assert units_for_se(0.05, 0.1, 2.0, cap=10) == 10  # never above the cap
    assert units_for_se(1.0, 0.1, 2.0, cap=10) == MIN_UNITS == 2  # never below 2 units
    assert units_for_se(0.05, 0.0, 2.0, cap=10) == 2 and units_for_se(0.05, 0.1, 0.0, cap=10) == 2
    size = EvalSize(max_units=3, se_target=0.05)
    args = SimpleNamespace()
    assert size.units(args, 5, lr=0.1) == 3  # no previous step yet: the cap
    size.observe(se_cond_e=0.1, n_units=3, lr=0.1)  # per-unit sd = 0.1 * sqrt(3) / 0.1
    assert size.unit_sd == pytest.approx(math.sqrt(3))
    assert (
        size.units(args, 5, lr=0.05) == 3 and size.units(args, 5, lr=0.02) == 2
    )  # 3 lr^2 / 0.05^2: 3 and 0.48
    assert [size.step_slice(5, m, k) for k, m in enumerate((3, 2, 3))] == [[0, 1, 2], [3, 4], [0, 1, 2]]


def test_se_target_sizes_each_step_from_the_previous_one(tmp_path):
    target = 1e-3
    cb = EntropyProbeCallback(
        EVAL_PROMPTS,
        group_size=2,
        max_new_tokens=3,
        max_eval_units=5,
        se_target=target,
        config=ProbeConfig(direction="optimizer-step", entropy="token"),
    )
    seen = EvalPrompts(cb)
    grpo_trainer(tmp_path, callbacks=[cb, seen], steps=4).train()
    rec = cb.records
    assert rec[0]["n_eval_units"] == 5 and all(r["se_target"] == target for r in rec)
    for prev, now in zip(rec, rec[1:]):  # the size the formula gives from the previous record
        sd = prev["se_cond_e"] * math.sqrt(prev["n_eval_units"]) / prev["lr"]
        assert now["n_eval_units"] == units_for_se(target, now["lr"], sd, 5)
    assert [len(p) for p in seen.steps] == [r["n_eval_units"] for r in rec]
    assert {r["n_eval_units"] for r in rec[1:]} != {5}  # the target moved the size (else untested)
    for bad in (0, -1e-3, math.inf, math.nan, True, "1e-3"):
        with pytest.raises(ValueError, match="EntropyProbeCallback.se_target must be None or a finite"):
            EntropyProbeCallback(EVAL_PROMPTS, se_target=bad)
