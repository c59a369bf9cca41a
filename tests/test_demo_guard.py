"""``entropy-probe demo-guard`` (and ``demo --entropy-budget``) on a shortened run.

- the pair writes its files, and the guarded run's columns agree with the guard's definition: a scaled
  step's 95% bound sits on the budget (its forecast is ``scale * forecast``, first order), the real AdamW
  step is ``scale * lr * v`` (``step_relative_error`` is measured against the scaled step), every
  unscaled step's full-step bound is already within the budget;
- with a budget that never binds the guarded run is the unguarded run, bit for bit.

Run: ``PYTHONPATH=src python -m pytest -q tests/test_demo_guard.py`` (about 15 s).
"""

import json

import matplotlib.image
import pytest
from test_demo import SHORT, read_csv

from entropy_probe.demo import guarded
from entropy_probe.guard import EntropyGuard

Z_ONE_SIDED = EntropyGuard(1.0).z  # 1.645 at the default level 0.95


def run_pair(out, budget: float) -> dict:
    assert guarded.main(SHORT + ["--seed", "1", "--out", str(out), "--entropy-budget", str(budget)]) == 0
    return json.loads((out / "demo_guard.json").read_text())


def test_guarded_pair_writes_its_files_and_scaled_steps_sit_on_the_budget(tmp_path):
    budget = 1e-3  # well inside the short run's forecast drops: the guard binds on some steps
    comparison = run_pair(tmp_path, budget)
    for name in ("unguarded", "guarded"):
        assert (tmp_path / name / "steps.csv").exists() and (tmp_path / name / "demo.png").exists()
    img = matplotlib.image.imread(tmp_path / "demo_guard.png")
    assert img.ndim == 3 and img.shape[1] > 1000
    rows = json.loads((tmp_path / "guarded" / "demo.json").read_text())["steps"]
    assert [float(r["guard_scale"]) for r in read_csv(tmp_path / "guarded" / "steps.csv")] == [
        r["guard_scale"] for r in rows
    ]
    scaled = [r for r in rows if r["guard_reason"] == "scaled"]
    assert scaled, "the budget must bind on at least one step of this seed"
    for r in rows:
        # The demo forecasts with the second order, so the guard's forecast at scale c is
        # c * delta_h1 + c^2 * delta_h2, and its bound at c = 1 is the full step's
        # forecast2 - z * forecast2_se.
        full_bound = r["forecast2"] - Z_ONE_SIDED * r["forecast2_se"]
        if r["guard_reason"] == "scaled":
            c = r["guard_scale"]
            assert 0 < c < 1 and full_bound < -budget
            assert r["guard_bound"] == pytest.approx(-budget, rel=1e-9)  # the budget equation, solved
            assert r["guard_bound"] == pytest.approx(
                r["guard_forecast"] - Z_ONE_SIDED * r["guard_se"], rel=1e-12
            )
            assert r["guard_forecast"] == pytest.approx(c * r["forecast"] + c * c * r["delta_h2"], rel=1e-12)
        else:
            assert r["guard_scale"] == 1 and full_bound >= -budget
        # fp32 round-off only (tests/test_demo.py); a step not scaled by the guard would be off by 1 - scale
        assert r["step_relative_error"] < 1e-3
    g = comparison["guarded"]
    assert g["fraction_scaled"] == len(scaled) / len(rows)
    assert g["mean_scale"] == pytest.approx(sum(r["guard_scale"] for r in rows) / len(rows), rel=1e-12)
    assert "fraction_scaled" not in comparison["unguarded"]


def test_a_budget_that_never_binds_changes_nothing(tmp_path):
    comparison = run_pair(tmp_path, 1e9)
    assert comparison["guarded"]["fraction_scaled"] == 0 and comparison["guarded"]["mean_scale"] == 1
    plain = read_csv(tmp_path / "unguarded" / "steps.csv")
    guarded_rows = read_csv(tmp_path / "guarded" / "steps.csv")
    for a, b in zip(plain, guarded_rows, strict=True):
        assert {k: v for k, v in b.items() if not k.startswith("guard_")} == a  # the same text, bit for bit


def test_bad_budget_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        guarded.main(["--entropy-budget", "-1"])
    assert exit_.value.code == 2 and "--entropy-budget" in capsys.readouterr().err
