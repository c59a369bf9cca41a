"""``entropy-probe demo`` end to end on a shortened run, and its synthetic task.

Run: ``PYTHONPATH=src python -m pytest -q tests/test_demo.py``.

The shortened demo (3 GRPO steps, a 1-layer model, small batches) must write demo.json, steps.csv
and demo.png whose figures agree with each other and with a recomputation from the per-step rows,
take real AdamW steps equal to the step the probe forecast, and be reproducible for a seed.
"""

import csv
import json
import math

import numpy as np
import pytest
import torch

from entropy_probe import demo
from entropy_probe.demo.task import SortingTask
from entropy_probe.statistics import Z95

SHORT = [
    "--steps",
    "3",
    "--warmup-steps",
    "4",
    "--update-prompts",
    "4",
    "--eval-prompts",
    "6",
    "--measure-prompts",
    "8",
    "--group-size",
    "4",
    "--width",
    "32",
    "--layers",
    "1",
    "--heads",
    "2",
    "--device",
    "cpu",
]


def run_demo(out, seed: int = 1, extra=()) -> dict:
    assert demo.main(SHORT + ["--seed", str(seed), "--out", str(out), *extra]) == 0
    return json.loads((out / "demo.json").read_text())


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_short_demo_files_agree_with_each_other(tmp_path):
    doc = run_demo(tmp_path)
    rows, summary = doc["steps"], doc["summary"]
    # The config recorded is the one asked for.
    assert doc["config"]["steps"] == 3 and doc["config"]["group_size"] == 4 and doc["config"]["seed"] == 1
    assert [r["step"] for r in rows] == [1, 2, 3] and summary["steps"] == 3

    # CSV and JSON hold the same numbers (repr round-trips floats exactly).
    table = read_csv(tmp_path / "steps.csv")
    assert len(table) == len(rows)
    for from_csv, from_json in zip(table, rows):
        assert list(from_csv) == list(from_json)
        assert all(float(from_csv[k]) == float(from_json[k]) for k in from_json)

    # The picture is a real image.
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "demo.png")
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 600

    z = Z95
    for r in rows:
        assert r["forecast_lo95"] == pytest.approx(r["forecast"] - z * r["forecast_se"], abs=1e-12)
        assert r["forecast_hi95"] == pytest.approx(r["forecast"] + z * r["forecast_se"], abs=1e-12)
        assert r["truth_inside"] == int(r["forecast_lo95"] <= r["truth"] <= r["forecast_hi95"])
        # The measured change is the paired mean: mean(h_after - h_before) = H_after - H_before.
        assert r["measured"] == pytest.approx(r["entropy_after"] - r["entropy"], abs=1e-12)
        assert r["measured_z"] == pytest.approx(
            (r["measured"] - r["forecast"]) / math.hypot(r["forecast_se"], r["measured_se"]), rel=1e-12
        )
        # For a mean, the delete-one jackknife SE equals the plug-in SE exactly (DESIGN section 5).
        assert r["forecast_se_jackknife"] == pytest.approx(r["forecast_se"], rel=1e-9)
        assert r["forecast_se_total"] >= r["forecast_se"]  # adds the variance over U
        assert 0 < r["truth_ess"] <= 6 * 4  # at most the number of E sequences
        assert 0 <= r["reward"] <= 1 and 0 <= r["reward_update"] <= 1
        # The real AdamW step (optimizer.step() after clip_grad_norm_) is theta + eta * v of the
        # forecast: equal up to fp32 round-off, which Adam rescales in directions whose gradient is
        # analytically 0 (GPT-2's key biases): observed 3e-6 here, 2e-4 at worst over the 40 steps of the
        # full demo. A real mismatch is far above 1e-3: dropping the loss's 1/B_U or the clipping gives 7e-2.
        assert r["step_relative_error"] < 1e-3
        # Second order and attribution: the forecast adds delta_h2; the groups split delta_h1 exactly.
        assert r["forecast2"] == pytest.approx(r["forecast"] + r["delta_h2"], abs=1e-15)
        assert r["forecast2_lo95"] == pytest.approx(r["forecast2"] - z * r["forecast2_se"], abs=1e-12)
        assert r["truth_inside2"] == int(r["forecast2_lo95"] <= r["truth"] <= r["forecast2_hi95"])
        groups = [k for k in r if k.startswith("group:")]
        assert groups == ["group:embeddings", "group:block.0", "group:head"]  # --layers 1
        assert sum(r[k] for k in groups) == pytest.approx(r["forecast"], abs=1e-15)

    # The summary is recomputable from the rows.
    col = lambda k: np.array([r[k] for r in rows], dtype=float)  # noqa: E731
    assert summary["coverage95"] == pytest.approx(col("truth_inside").mean(), abs=0)
    assert summary["coverage95_measured"] == pytest.approx(np.mean(np.abs(col("measured_z")) <= z), abs=0)
    assert summary["truth_unreliable_steps"] == 0 and all(r["truth_reliable"] == 1 for r in rows)
    assert summary["correlation"] == pytest.approx(np.corrcoef(col("forecast"), col("truth"))[0, 1], rel=1e-9)
    assert summary["correlation_measured"] == pytest.approx(
        np.corrcoef(col("forecast"), col("measured"))[0, 1], rel=1e-9
    )
    assert summary["sum_forecast"] == pytest.approx(col("forecast").sum(), rel=1e-12)
    assert summary["sum_forecast_se"] == pytest.approx(np.sqrt((col("forecast_se") ** 2).sum()), rel=1e-12)
    assert summary["sum_truth"] == pytest.approx(col("truth").sum(), rel=1e-12)
    assert summary["sum_measured"] == pytest.approx(col("measured").sum(), rel=1e-12)
    assert summary["measured_z_mean"] == pytest.approx(col("measured_z").mean(), rel=1e-12)
    assert summary["measured_z_sd"] == pytest.approx(col("measured_z").std(ddof=1), rel=1e-9)
    gap = col("truth") - col("forecast")
    assert summary["mean_truth_minus_forecast"] == pytest.approx(gap.mean(), rel=1e-9)
    assert summary["mean_truth_minus_forecast_se"] == pytest.approx(gap.std(ddof=1) / np.sqrt(3), rel=1e-9)
    assert (
        summary["entropy_start"] == rows[0]["entropy"] and summary["entropy_end"] == rows[-1]["entropy_after"]
    )
    assert (
        summary["reward_start"] == rows[0]["reward"] and summary["reward_end"] == rows[-1]["reward"]
    )  # k = 1
    assert summary["max_step_relative_error"] == max(col("step_relative_error"))
    assert summary["correlation2"] == pytest.approx(
        np.corrcoef(col("forecast2"), col("truth"))[0, 1], rel=1e-9
    )
    assert summary["sum_forecast2"] == pytest.approx(col("forecast2").sum(), rel=1e-12)
    assert summary["sum_forecast2_se"] == pytest.approx(np.sqrt((col("forecast2_se") ** 2).sum()), rel=1e-12)
    assert summary["sum_truth_minus_forecast2_se"] == pytest.approx(
        np.sqrt((col("truth_se_diff2") ** 2).sum()), rel=1e-12
    )
    assert summary["coverage95_2"] == pytest.approx(col("truth_inside2").mean(), abs=0)
    layers = matplotlib.image.imread(tmp_path / "layers.png")  # the heat map by parameter group
    assert layers.ndim == 3 and layers.shape[1] > 600 and float(layers[..., :3].std()) > 0.05
    influence = matplotlib.image.imread(tmp_path / "influence.png")  # the U prompts of the largest drop
    assert influence.ndim == 3 and float(influence[..., :3].std()) > 0.05
    assert not any(k.startswith("_") for k in rows[0])  # per-prompt lists stay out of the CSV and JSON rows


def test_short_demo_is_reproducible_for_a_seed(tmp_path):
    a = run_demo(tmp_path / "a", seed=3)
    b = run_demo(tmp_path / "b", seed=3)
    assert (tmp_path / "a" / "steps.csv").read_bytes() == (tmp_path / "b" / "steps.csv").read_bytes()
    assert a["summary"] == b["summary"]
    c = run_demo(tmp_path / "c", seed=4)
    assert c["steps"][0]["forecast"] != a["steps"][0]["forecast"]


def test_grpo_raises_reward_and_lowers_entropy(tmp_path):
    """16 steps at the demo's defaults (smaller E and F): learning must be visible beyond noise.

    Entropy: the summed paired fresh-sample changes against their SE (independent steps, so
    variances add). Reward: mean of the last 4 steps minus the first 4, SE from the per-step SEs
    (independent fresh samples). Both one-sided at 3 SE (p = 0.0013 under "nothing changes").
    """
    argv = [
        "--steps",
        "16",
        "--eval-prompts",
        "16",
        "--measure-prompts",
        "64",
        "--seed",
        "0",
        "--out",
        str(tmp_path),
    ]
    assert demo.main(argv) == 0
    doc = json.loads((tmp_path / "demo.json").read_text())
    s, rows = doc["summary"], doc["steps"]
    assert s["sum_measured"] < -3 * s["sum_measured_se"]
    reward = np.array([r["reward"] for r in rows])
    reward_se = np.array([r["reward_se"] for r in rows])
    rise = reward[-4:].mean() - reward[:4].mean()
    assert rise == pytest.approx(s["reward_end"] - s["reward_start"], abs=1e-12)
    assert rise > 3 * np.sqrt((reward_se[-4:] ** 2).sum() + (reward_se[:4] ** 2).sum()) / 4
    assert s["entropy_end"] < s["entropy_start"]


def test_llama_class_runs_too(tmp_path):
    doc = run_demo(tmp_path, extra=["--arch", "llama", "--steps", "1"])
    assert doc["steps"][0]["step_relative_error"] < 1e-3 and math.isfinite(doc["steps"][0]["truth"])


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--steps",
        "--seed",
        "--arch",
        "--layers",
        "--width",
        "--update-prompts",
        "--eval-prompts",
        "--group-size",
        "--lr",
        "--out",
        "--device",
    ):
        assert option in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--group-size", "1"], "--group-size"),
        (["--steps", "0"], "--steps"),
        (["--lr", "nan"], "--lr"),
        (["--eval-prompts", "1"], "--eval-prompts"),
        (["--entropy", "tokens"], "--entropy"),
    ],
)
def test_bad_options_are_refused(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


# ---- the sorting task ------------------------------------------------------------------------------
def test_sorting_task_reward_gives_partial_credit_per_position():
    task = SortingTask(n_digits=6)
    prompt = (4, 1, 3, 1, task.sep)
    assert task.target(prompt) == (1, 1, 3, 4, task.eos)
    assert task.reward(prompt, (1, 1, 3, 4, task.eos)) == 1.0
    assert task.reward(prompt, (1, 1, 4, 3, task.eos)) == 3 / 5
    assert task.reward(prompt, (1, 1, 3, 4, 5, task.eos)) == 4 / 5  # no EOS where it belongs
    assert task.reward(prompt, (task.eos,)) == 0.0


def test_sorting_task_prompts_and_supervised_batch():
    task = SortingTask(n_digits=5, min_len=2, max_len=4)
    gen = torch.Generator().manual_seed(0)
    prompts = task.prompts(200, gen)
    assert {len(p) - 1 for p in prompts} == {2, 3, 4}  # every length occurs
    assert all(p[-1] == task.sep and all(0 <= d < 5 for d in p[:-1]) for p in prompts)
    batch = task.supervised_batch(16, torch.Generator().manual_seed(1))
    again = task.prompts(16, torch.Generator().manual_seed(1))
    for row, p in enumerate(again):
        ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        answer = batch.input_ids[row][batch.response_mask[row].bool()].tolist()
        assert ids == list(p) + answer and tuple(answer) == task.target(p)
        assert batch.attention_mask[row, -1] == 1  # left-padded: the sequence ends at the last column


def test_steps_with_an_unreliable_truth_are_left_out_of_the_correlations():
    """A step flagged ``truth_reliable = 0`` (ESS below 10%) is counted and not correlated; the rest is."""
    from entropy_probe.demo.report import summarize

    gen = np.random.default_rng(0)
    rows = []
    for step in range(12):
        truth = float(gen.normal())
        rows.append(
            dict(step=step + 1, truth=truth, forecast=truth + 0.1 * float(gen.normal()), truth_reliable=1)
        )
    rows[5].update(truth=50.0, truth_reliable=0)  # a wild truth: included, it would decide the correlation
    for r in rows:
        r.update(
            forecast2=r["forecast"], measured=r["truth"], reward=0.5, entropy=1.0, entropy_after=1.0,
            forecast_se=0.1, forecast2_se=0.1, truth_se=0.1, truth_se_diff=0.1, truth_se_diff2=0.1,
            measured_se=0.1, measured_z=0.0, truth_inside=1, truth_inside2=1, step_relative_error=0.0,
        )  # fmt: skip
    kept = [r for r in rows if r["truth_reliable"]]
    expected = np.corrcoef([r["forecast"] for r in kept], [r["truth"] for r in kept])[0, 1]
    s = summarize(rows)
    assert s["truth_unreliable_steps"] == 1
    assert s["correlation"] == pytest.approx(expected, rel=1e-12) and s["correlation"] > 0.9
    assert s["correlation2"] == pytest.approx(expected, rel=1e-12)
    assert s["sum_truth"] == pytest.approx(sum(r["truth"] for r in rows))  # sums keep every step


# ---- the two functionals and the trainer's logged entropy ----------------------------------------
def _independent_entropies(model, batch, temperature: float) -> tuple[float, float]:
    """``(sum(m H_t) / sum(m), mean_i -S_w,i)`` of ``batch`` from a plain Hugging Face forward and
    ``torch.distributions.Categorical``, not the library's token or sequence code: the token-level formula
    TRL logs (full-vocabulary H_t at the temperature, EOS counted) and the per-response mean surprisal."""
    mask = batch.attention_mask
    positions = (mask.long().cumsum(1) - 1).clamp_min(0)  # left padding: real tokens count 0, 1, 2, ...
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions).logits
    dist = torch.distributions.Categorical(logits=logits[:, :-1].double() / temperature)  # predicts t + 1
    m = batch.response_mask[:, 1:].double()  # (N, T - 1)
    h = dist.entropy()  # (N, T - 1)
    logp = dist.log_prob(batch.input_ids[:, 1:])
    token_level = float((h * m).sum() / m.sum())
    per_response = float((-(logp * m).sum(1) / m.sum(1)).mean())  # equal units: the mean over units too
    return token_level, per_response


@pytest.mark.parametrize("functional", ["token", "sequence"])
def test_logged_and_probe_entropies_equal_an_independent_computation(functional):
    """Two GRPO steps replayed with ``train.build``/``rl_step``: before each step, a copy of the model and
    of the data generator re-draws U, E and F (same prompts and seeds as the demo) and recomputes
    - ``trainer_entropy``: TRL's formula on U, whatever the functional;
    - ``probe_entropy`` (``result.entropy`` on E) and ``entropy`` (F): the functional ``--entropy`` names,
      so that option reaches the probe's ``ProbeConfig``.
    The series agree to float rounding (fp32 forward, float64 sums): 1e-5 relative."""
    import copy

    from entropy_probe.demo.config import parse_args
    from entropy_probe.demo.train import _seed, build, rl_step, supervised_warmup
    from entropy_probe.sampling import sample_rollouts

    cfg = parse_args(SHORT + ["--seed", "2", "--entropy", functional])
    assert cfg.entropy == functional
    task, probe, gen = build(cfg)
    assert probe.config.entropy == functional
    supervised_warmup(probe.model, probe.optimizer, task, cfg, gen)
    for group in probe.optimizer.param_groups:
        group["lr"] = cfg.lr
    which = 0 if functional == "token" else 1
    for step in range(2):
        model, replay = copy.deepcopy(probe.model), torch.Generator().set_state(gen.get_state())
        row = rl_step(step, probe, task, cfg, gen)
        expected = []
        for role, n_prompts in enumerate((cfg.update_prompts, cfg.eval_prompts, cfg.measure_prompts)):
            prompts = task.prompts(n_prompts, replay)
            batch = sample_rollouts(
                model, prompts, cfg.group_size, task.max_new_tokens, task.eos, task.reward, 1.0,
                _seed(cfg, step, role),
            )  # fmt: skip
            expected.append(_independent_entropies(model, batch, 1.0))
        assert row["trainer_entropy"] == pytest.approx(expected[0][0], rel=1e-5)
        assert row["probe_entropy"] == pytest.approx(expected[1][which], rel=1e-5)
        assert row["entropy"] == pytest.approx(expected[2][which], rel=1e-5)
        # the two functionals differ here by far more than the tolerance: the test tells them apart
        assert abs(expected[1][0] - expected[1][1]) > 1e-3 * expected[1][0]


def test_entropy_option_reaches_the_record(tmp_path):
    """``--entropy sequence``: the config records it and the run's summary has the logged-entropy figures."""
    doc = run_demo(tmp_path, extra=["--entropy", "sequence", "--steps", "2"])
    assert doc["config"]["entropy"] == "sequence"
    rows, s = doc["steps"], doc["summary"]
    gap = np.array([r["probe_entropy"] - r["trainer_entropy"] for r in rows])
    assert s["probe_minus_logged"] == pytest.approx(gap.mean(), rel=1e-12)
    assert s["probe_minus_logged_se"] == pytest.approx(gap.std(ddof=1) / np.sqrt(2), rel=1e-9)
    z = np.array([(r["truth"] - r["forecast"]) / r["truth_se_diff"] for r in rows])
    assert s["truth_z_sd"] == pytest.approx(z.std(ddof=1), rel=1e-9)
    assert s["truth_z_mean"] == pytest.approx(z.mean(), rel=1e-9)
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "entropy.png")
    assert img.ndim == 3 and float(img[..., :3].std()) > 0.05
