"""``EntropyProbeCallback(entropy_target=..., control_mode=...)`` inside a real TRL ``GRPOTrainer``.

From the same seed and state as an observing run: with the target at the entropy now and a band a
quarter of the first step's forecast, "scale" binds, and the first real parameter change is exactly
``control/scale`` times the observing run's (AdamW with weight decay: linear in the lr); the lrs are
scaled during that step only. "steer" with a target far above puts a positive bonus into ``.grad`` for
the step (the lrs untouched) and logs lambda. Decisions reach log_history and the JSON lines.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl")

from test_trl_guard import EVAL_PROMPTS, StepTrace
from trl_support import grpo_trainer

from entropy_probe.control import REASONS
from entropy_probe.integrations.trl import EntropyProbeCallback


def _run(out, steps=2, **control):
    cb = EntropyProbeCallback(EVAL_PROMPTS, group_size=4, max_new_tokens=4, **control)
    trace = StepTrace()
    trainer = grpo_trainer(out, callbacks=[cb, trace], steps=steps, loss_type="dapo", weight_decay=0.01)
    trainer.train()
    return trainer, cb, trace


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("plain"))


def test_scale_mode_step_is_scale_times_the_plain_step(plain, tmp_path):
    _, plain_cb, plain_trace = plain
    first = plain_cb.records[0]
    target, band = first["entropy"], abs(first["delta_h1"]) / 4
    trainer, cb, trace = _run(tmp_path, entropy_target=target, control_band=band, control_mode="scale")
    rec = cb.records[0]
    assert rec["control_reason"] == "scaled" and 0 < rec["control/scale"] < 1
    c = rec["control/scale"]
    for name, full in plain_trace.rows[0]["moved"].items():
        scaled = trace.rows[0]["moved"][name]
        assert float((scaled - c * full).abs().max()) <= 1e-5 * float(full.abs().max()) + 1e-12, name
    assert trace.rows[0]["lr_during"] == pytest.approx([c * lr for lr in plain_trace.rows[0]["lr_during"]])
    assert trace.rows[0]["lr_after"] == plain_trace.rows[0]["lr_after"]
    logged = [h for h in trainer.state.log_history if "entropy_probe/control/scale" in h]
    assert logged and logged[0]["entropy_probe/control/scale"] == c
    lines = [json.loads(x) for x in (tmp_path / "entropy_probe.jsonl").read_text().splitlines()]
    assert lines[0]["control/scale"] == c and lines[0]["control_mode"] == "scale"


def test_steer_mode_decides_each_step_and_keeps_the_lrs(plain, tmp_path):
    """The bonus's reach depends on this tiny E (4 units, 2 a half) and Adam's first step (~sign(g)):
    lambda 0 ("no-direction") is a valid answer; when lambda != 0 the step differs from the plain one."""
    _, plain_cb, plain_trace = plain
    target = plain_cb.records[0]["entropy"] + 2.0  # far above the band: steering wants more entropy
    _, cb, trace = _run(tmp_path, entropy_target=target, control_band=0.01, control_mode="steer")
    assert [r["control_mode"] for r in cb.records] == ["steer", "steer"]
    assert all(r["control_reason"] in REASONS for r in cb.records)
    assert trace.rows[0]["lr_during"] == plain_trace.rows[0]["lr_during"]
    moved_plain, moved = plain_trace.rows[0]["moved"], trace.rows[0]["moved"]
    changed = any(not torch.equal(moved_plain[n], moved[n]) for n in moved)
    assert changed == (cb.records[0]["control/coefficient"] != 0)


def test_bad_control_options_are_refused():
    with pytest.raises(ValueError, match="not both"):
        EntropyProbeCallback(EVAL_PROMPTS, entropy_budget=0.1, entropy_target=1.0)
    with pytest.raises(ValueError, match="EntropyController: mode"):
        EntropyProbeCallback(EVAL_PROMPTS, entropy_target=1.0, control_mode="pid")
    with pytest.raises(ValueError, match="EntropyController: band"):
        EntropyProbeCallback(EVAL_PROMPTS, entropy_target=1.0, control_band=-1.0)


def test_control_entropy_trainer_starts_from_the_trainers_logged_entropy(tmp_path):
    trainer, cb, _ = _run(tmp_path, entropy_target=1.0, control_entropy="trainer")
    logged = [h["entropy"] for h in trainer.state.log_history if "entropy" in h]
    assert cb.records[0]["control/entropy"] == cb.records[0]["entropy"]  # no log yet: the probe's
    assert cb.records[1]["control/entropy"] == pytest.approx(logged[0], abs=0)  # step 1's log, before step 2
    with pytest.raises(ValueError, match="control_entropy"):
        EntropyProbeCallback(EVAL_PROMPTS, entropy_target=1.0, control_entropy="batch")
