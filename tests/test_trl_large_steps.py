"""examples/trl_large_steps.py on 3 steps (docs/large_steps.md, "In a real GRPOTrainer at lr 5e-3"): a real
GRPOTrainer at lr 5e-3, the callback's reliable flag and prediction per step, the fresh-sample change."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_large_steps.py"


def run_example(monkeypatch, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["trl_large_steps.py", *argv])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(EXAMPLE), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
        sys.path[:] = [p for p in sys.path if p != str(EXAMPLE.parent)]


def test_the_fresh_sample_change_is_exactly_zero_without_a_step(tmp_path, monkeypatch):
    """lr 0: the same prompts and seed before and after the step draw the same rollouts from the same
    policy, so the paired fresh-sample change is 0 exactly (the probe left the model and RNG alone)."""
    run_example(monkeypatch, ["--out", str(tmp_path), "--steps", "1", "--lr", "0", "--fresh-prompts", "4"])
    (row,) = json.loads((tmp_path / "trl_large_steps.json").read_text())["steps"]
    assert row["fresh"] == 0.0 and row["fresh_se"] == 0.0 and row["reliable"]


def test_the_large_step_example_runs(tmp_path, monkeypatch):
    record = tmp_path / "record.json"
    argv = ["--out", str(tmp_path), "--steps", "3", "--fresh-prompts", "8", "--record", str(record)]
    run_example(monkeypatch, argv)
    doc = json.loads(record.read_text())
    assert doc["command"].startswith("python examples/trl_large_steps.py --out")
    data = doc["data"]
    assert data == json.loads((tmp_path / "trl_large_steps.json").read_text())
    assert data["options"]["lr"] == 5e-3 and data["options"]["fresh_prompts"] == 8
    rows, summary = data["steps"], data["summary"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    logged = [json.loads(line) for line in (tmp_path / "entropy_probe.jsonl").read_text().splitlines()]
    for r, log in zip(rows, logged, strict=True):
        # the callback logged the flag and the prediction; lookahead="always": the prediction is the lookahead
        assert r["reliable"] == log["reliable"] and r["prediction"] == log["prediction/value"]
        assert log["prediction_method"] == "lookahead" and r["prediction"] == r["lookahead"]
        assert r["first_order_lo95"] < r["first_order"] < r["first_order_hi95"]
        # the fresh-sample change is a different measurement from the same-E one, with its own SE
        assert r["fresh"] != r["measured_same_e"] and 0 < r["fresh_se"] < 1
        assert math.isfinite(r["fresh"]) and abs(r["fresh"]) < 1  # nats: a step at lr 5e-3 on 8 tokens
        assert r["ok"] == ((not r["reliable"]) or (r["covers"] and r["no_wider"]))
    assert summary["steps"] == 3 and summary["ok"] == sum(r["ok"] for r in rows)
    assert summary["flagged"] == sum(not r["reliable"] for r in rows)
    assert summary["ok_rate"] == pytest.approx(summary["ok"] / 3, rel=1e-12)
