"""``EntropyProbeCallback(entropy_budget=...)`` inside a real TRL ``GRPOTrainer`` (tests/trl_support.py).

Two runs from the same seed and state, one observing and one guarded at a third of the first step's
forecast drop (taken at its 95% bound), so the guard binds with scale exactly 1/3 (first order):

- the guarded run's first real parameter change equals ``scale`` times the unguarded one (AdamW, weight
  decay on: the step is linear in lr) and the optimizer moments are the same;
- the lrs are scaled during ``optimizer.step()`` only: right after it and at the next step they equal
  the scheduler's (the unguarded run's), so nothing drifts;
- ``entropy_probe/guard_scale`` (and the other guard metrics) are in ``log_history`` and the JSON lines,
  and ``guard_forecast`` is the forecast at the scale that ``measure_change`` is compared to.

The head-to-head example (no control, TRL's adaptive entropy bonus, the guard) runs on 3 steps.

Run: ``PYTHONPATH=src pytest -q tests/test_trl_guard.py`` (about 5 s).
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from transformers import TrainerCallback
from trl_support import grpo_trainer

from entropy_probe.from_grad import unwrap_optimizer
from entropy_probe.guard import EntropyGuard
from entropy_probe.integrations.trl import EntropyProbeCallback

EVAL_PROMPTS = ["a b c", "d e f", "g h a", "b b d"]
Z95_ONE_SIDED = EntropyGuard(1.0).z


class StepTrace(TrainerCallback):
    """After the probe's callback: the lrs the step runs with, the lrs right after it, the change of theta."""

    def __init__(self):
        self.rows = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.lr_during = [g["lr"] for g in unwrap_optimizer(optimizer).param_groups]

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        moved = {n: p.detach() - self.before[n] for n, p in model.named_parameters()}
        lr_after = [g["lr"] for g in unwrap_optimizer(optimizer).param_groups]
        self.rows.append(
            {"moved": moved, "before": self.before, "lr_during": self.lr_during, "lr_after": lr_after}
        )


def _run(out, budget, steps=2):
    cb = EntropyProbeCallback(
        EVAL_PROMPTS, group_size=4, max_new_tokens=4, entropy_budget=budget, max_eval_units=len(EVAL_PROMPTS)
    )  # every prompt each step (the default is the trainer's 2 prompts per step): this seed's guard binds
    trace = StepTrace()
    trainer = grpo_trainer(out, callbacks=[cb, trace], steps=steps, loss_type="dapo", weight_decay=0.01)
    trainer.train()
    return trainer, cb, trace


@pytest.fixture(scope="module")
def plain_and_guarded(tmp_path_factory):
    plain = _run(tmp_path_factory.mktemp("plain"), budget=None)
    first = plain[1].records[0]
    bound = first["delta_h1"] - Z95_ONE_SIDED * first["se_cond_e"]  # the full step's 95% lower bound
    assert bound < 0, "this seed's first step must lower entropy at its bound for the guard to bind"
    budget = -bound / 3
    guarded = _run(tmp_path_factory.mktemp("guarded"), budget=budget)
    return plain, guarded, budget


def test_guarded_step_is_scale_times_the_unguarded_step(plain_and_guarded):
    (_, plain_cb, plain_trace), (_, cb, trace), budget = plain_and_guarded
    first = cb.records[0]
    # Same seed, same state: the guarded run's first forecast is the unguarded one, bit for bit.
    assert first["delta_h1"] == plain_cb.records[0]["delta_h1"]
    assert first["guard_reason"] == "scaled" and first["guard_order"] == 1
    # first order the budget equation is linear: scale = budget / -bound(1) = 1/3
    assert first["guard_scale"] == pytest.approx(1 / 3, rel=1e-12)
    assert first["guard_bound"] == pytest.approx(-budget, rel=1e-9)
    assert first["guard_forecast"] == pytest.approx(first["delta_h1"] / 3, rel=1e-12)
    # the step actually taken, under its own names; delta_h1 stays the unscaled step's forecast
    assert first["taken/scale"] == first["guard_scale"]
    assert first["taken/delta_h1"] == pytest.approx(first["delta_h1"] / 3, rel=1e-12)
    assert first["taken/lr"] == pytest.approx(first["lr"] / 3, rel=1e-12)
    scale = first["guard_scale"]
    eps = torch.finfo(torch.float32).eps
    for name, unguarded in plain_trace.rows[0]["moved"].items():
        guarded, theta = trace.rows[0]["moved"][name], trace.rows[0]["before"][name]
        # fp32, element by element: AdamW rounds theta twice per step (decay, then addcdiv), at most
        # ulp(theta) <= eps |theta| each, in both runs; theta_after - theta is exact (Sterbenz); the
        # step's own arithmetic rounds at a few eps of the step. Not scaling would miss by 2/3 of the step.
        bound = 2 * eps * theta.abs() + 4 * eps * (scale * unguarded).abs()
        assert ((guarded - scale * unguarded).abs() <= bound).all(), name
    assert any(float(m.norm()) > 0 for m in trace.rows[0]["moved"].values())


def test_lrs_are_scaled_for_the_step_only(plain_and_guarded):
    (plain, _, plain_trace), (guarded, cb, trace), _ = plain_and_guarded
    for step, (p_row, g_row, rec) in enumerate(zip(plain_trace.rows, trace.rows, cb.records)):
        # during the step: the scheduler's lr x scale; right after it: the scheduler's lr, bit for bit
        assert g_row["lr_during"] == [lr * rec["guard_scale"] for lr in p_row["lr_during"]], step
        assert g_row["lr_after"] == p_row["lr_after"] == p_row["lr_during"], step
    logged = lambda t: [h["learning_rate"] for h in t.state.log_history if "learning_rate" in h]  # noqa: E731
    assert logged(guarded) == logged(plain) and len(logged(plain)) == 2
    final = lambda t: [g["lr"] for g in unwrap_optimizer(t.optimizer).param_groups]  # noqa: E731
    assert final(guarded) == final(plain)


def test_guard_metrics_reach_log_history_and_the_jsonl(plain_and_guarded):
    (_, plain_cb, _), (guarded, cb, _), budget = plain_and_guarded
    assert all("guard_scale" not in r for r in plain_cb.records)  # observing only: no guard metrics
    logged = {h["step"]: h for h in guarded.state.log_history if "entropy_probe/guard_scale" in h}
    assert sorted(logged) == [1, 2]
    for rec in cb.records:
        h = logged[rec["step"]]
        assert 0 < rec["guard_scale"] <= 1 and h["entropy_probe/guard_scale"] == rec["guard_scale"]
        assert h["entropy_probe/guard_bound"] >= -budget * (1 + 1e-9)  # every step keeps its bound in budget
        assert h["entropy_probe/guard_measured_minus_forecast"] == pytest.approx(
            rec["measured/delta_h"] - rec["guard_forecast"], abs=0
        )


def test_unprobed_steps_are_not_guarded_and_bad_options_are_refused(tmp_path):
    cb = EntropyProbeCallback(
        EVAL_PROMPTS, every=2, group_size=2, max_new_tokens=3, entropy_budget=1e-9, max_eval_units=4
    )
    trace = StepTrace()
    grpo_trainer(tmp_path, callbacks=[cb, trace], steps=2).train()
    assert [r["step"] for r in cb.records] == [1] and cb.records[0]["guard_reason"] == "scaled"
    # step 0 probed and scaled by the tiny budget; step 1 not probed: the scheduler's lr untouched
    assert trace.rows[0]["lr_during"][0] < trace.rows[0]["lr_after"][0]
    assert trace.rows[1]["lr_during"] == trace.rows[1]["lr_after"]
    assert cb._guarded is None
    with pytest.raises(ValueError, match="max_drop must be a finite number of nats > 0"):
        EntropyProbeCallback(EVAL_PROMPTS, entropy_budget=-0.1)
    with pytest.raises(ValueError, match="level must be in"):
        EntropyProbeCallback(EVAL_PROMPTS, entropy_budget=0.1, level=1.5)


def test_a_skipped_step_still_gets_its_lrs_back():
    """``on_optimizer_step`` closes the guard when the step never ran (accelerate skipping it)."""
    cb = EntropyProbeCallback(EVAL_PROMPTS, entropy_budget=0.01)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.5)
    decision = cb._guard_step(opt, SimpleNamespace(delta_h1=-1.0, se_cond_e=0.0, lr=0.5))
    assert decision.scale == pytest.approx(0.01, rel=1e-12)  # first order, SE 0: budget / drop
    assert opt.param_groups[0]["lr"] == 0.5 * decision.scale
    cb.on_optimizer_step(None, None, None)  # no optimizer.step() happened in between
    assert opt.param_groups[0]["lr"] == 0.5 and cb._guarded is None


def test_the_head_to_head_example_runs(tmp_path, monkeypatch):
    """examples/trl_entropy_control.py on 3 steps: three runs from one seed, the table's figures from them."""
    example = Path(__file__).resolve().parents[1] / "examples" / "trl_entropy_control.py"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "trl_entropy_control.py",
            "--out",
            str(tmp_path),
            "--steps",
            "3",
            "--budget",
            "1e-4",
            "--entropy-target",
            "9",
            "--record",
            str(tmp_path / "record.json"),
        ],
    )
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(example), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
        sys.path[:] = [p for p in sys.path if p != str(example.parent)]
    doc = json.loads((tmp_path / "entropy_control.json").read_text())
    assert json.loads((tmp_path / "record.json").read_text())["data"] == doc  # --record keeps the same JSON
    runs, summary = doc["runs"], doc["summary"]
    assert (tmp_path / "entropy_control.png").stat().st_size > 0
    assert all(len(runs[c]["entropy"]) == 3 for c in runs) and len(runs) == 5
    # the same seed and the same first batch: the controls only act from the first step's update on
    assert runs["none"]["entropy"][0] == runs["adaptive"]["entropy"][0] == runs["guard"]["entropy"][0]
    assert runs["guard"]["entropy"][1:] != runs["none"]["entropy"][1:]  # the guard changed the trajectory
    # entropy far below the target 9: TRL raises the coefficient by entropy_coef_delta every step
    assert runs["adaptive"]["entropy_coef"] == pytest.approx([0.02, 0.04, 0.06], abs=1e-12)
    # a budget of 1e-4 nats binds on every step the forecast says removes token entropy (the default
    # functional; on this run's first step the forecast is a gain, which the guard leaves alone)
    reasons = runs["guard"]["guard_reason"]
    assert set(reasons) <= {"scaled", "raises-entropy"} and "scaled" in reasons, reasons
    assert summary["guard"]["mean_scale"] == pytest.approx(sum(runs["guard"]["guard_scale"]) / 3, rel=1e-12)
    assert summary["none"]["entropy_min"] == min(runs["none"]["entropy"])
    # the controller's runs record their decisions; target 9 far above: every scale step moves towards it
    # at full scale or is stopped at min_scale
    assert set(runs["controller-scale"]["control_reason"]) <= {"toward-band", "away-from-band"}
    assert len(runs["controller-steer"]["control_coefficient"]) == 3
