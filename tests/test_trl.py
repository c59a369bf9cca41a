"""``EntropyProbeCallback`` inside a real TRL ``GRPOTrainer`` (tests/trl_support.py: tiny Qwen2, local
tokenizer).

- the forecast is of the step the trainer really takes: the real step ``(theta_after - theta_before) / lr``
  projected on the same E (a given direction) equals the ``from_grad`` forecast to 1e-5 relative, for TRL's
  loss types (dapo, grpo and bnpo with gradient accumulation 2, dr_grpo, a KL term beta = 0.04);
- ``measure_change`` equals an independent re-measurement: hand log-probs (log_softmax + gather) before
  and after the step and the importance-weighted change written out unit by unit in numpy;
- the metrics land in ``trainer.state.log_history``, in the JSON lines file, and, with ``attach``, reach
  a reporting callback placed where ``report_to`` integrations go;
- the trainer's weights, optimizer state and RNG are bit-identical with and without the callback.

Run: ``PYTHONPATH=src pytest -q tests/test_trl.py`` (about 10 s).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch

pytest.importorskip("trl")

from core_support import hand_entropy_change, hand_sequence_logprobs
from transformers import TrainerCallback
from trl_support import grpo_trainer, word_tokenizer

import entropy_probe as ep
from entropy_probe.integrations.trl import JSONL_NAME, EntropyProbeCallback, attach, tokenise_prompt

EVAL_PROMPTS = ["a b c", "d e f", "g h a", "b b d"]


class StepAudit(TrainerCallback):
    """Runs after the probe's callback at both optimizer events and re-derives what it reported."""

    def __init__(self, probe_cb: EntropyProbeCallback):
        self.probe_cb, self.rows = probe_cb, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.before = _copy_of(model)  # the parameters the forecast was made at
        self.result = self.probe_cb._pending[1]

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        result, before = self.result, self.before
        batch = result.eval_state.batch
        lr = result.lr
        old = dict(before.named_parameters())
        real_v = {n: (p.detach() - old[n].detach()) / lr for n, p in model.named_parameters()}
        entropy = self.probe_cb.config.entropy  # the callback's functional
        cfg = ep.ProbeConfig(lr=lr, temperature=args.temperature, entropy=entropy)
        along = ep.EntropyProbe(before, config=cfg).run(eval_batch=batch, direction=real_v, truth=True)
        self.rows.append(
            {
                "forecast": result.delta_h1,
                "projected": along.delta_h1,
                "measured": self.probe_cb.records[-1],
                # the step applied functionally to the parameters before it (theta + eta v_real)
                "truth": along.truth.delta_h,
                "by_hand": _change_by_hand(before, model, batch, args.temperature)
                if entropy == "sequence"
                else None,
            }
        )


def _copy_of(model):
    """A separate model with the same weights (copy.deepcopy of the Trainer's model shares its parameters)."""
    twin = type(model)(model.config)
    twin.load_state_dict(model.state_dict())
    return twin


def _change_by_hand(before, after, batch, temperature) -> float:
    """The truth's change of the token-mean entropy on E from hand log-probs (log_softmax + gather)."""
    with torch.no_grad():
        s0, w0 = hand_sequence_logprobs(before.eval(), batch, temperature)
        s1, w1 = hand_sequence_logprobs(_copy_of(after).eval(), batch, temperature)
    return hand_entropy_change(batch, s0, w0, s1, w1)


LOSS_CASES = {  # the callback's default functional ("token"), but for "grpo-sequence"
    "grpo-sequence": {"loss_type": "grpo"},
    "dapo": {"loss_type": "dapo"},
    "grpo-accum2": {"loss_type": "grpo", "gradient_accumulation_steps": 2},
    "bnpo-accum2": {"loss_type": "bnpo", "gradient_accumulation_steps": 2, "weight_decay": 0.01},
    "dr_grpo": {"loss_type": "dr_grpo"},
    "beta0.04": {"loss_type": "grpo", "beta": 0.04},
}


@pytest.mark.parametrize("case", LOSS_CASES, ids=list(LOSS_CASES))
def test_forecast_is_the_real_trl_step_and_measure_change_is_its_truth(case, tmp_path):
    config = (
        ep.ProbeConfig(direction="optimizer-step", entropy="sequence") if case == "grpo-sequence" else None
    )
    cb = EntropyProbeCallback(EVAL_PROMPTS, group_size=4, max_new_tokens=4, config=config)
    assert cb.config.entropy == ("sequence" if case == "grpo-sequence" else "token")  # the default: token
    audit = StepAudit(cb)
    grpo_trainer(tmp_path, callbacks=[cb, audit], steps=2, **LOSS_CASES[case]).train()
    assert len(audit.rows) == 2
    for row in audit.rows:
        measured = row["measured"]["measured/delta_h"]
        print(case, row["forecast"], row["projected"], measured, row["truth"], row["by_hand"])
        # fp32 both sides; real_v is read from fp32 parameters (rounding ~1e-7 of the step); 1e-5 is the
        # issue's bar (measured here: ~5e-8)
        assert abs(row["projected"] - row["forecast"]) <= 1e-5 * abs(row["forecast"])
        # the same log-probs up to fp32 forward differences (~1e-7 nats): 1e-6 on a change of ~1e-2; the
        # measured change after the real step is the functional truth of theta + eta v_real, and for the
        # sequence functional also the truth written out by hand (numpy)
        assert abs(measured - row["truth"]) < 1e-6
        if row["by_hand"] is not None:
            assert abs(measured - row["by_hand"]) < 1e-6 and row["by_hand"] != 0
        assert row["forecast"] != 0 and measured != 0


class Reporter(TrainerCallback):
    """A reporting callback: records each log as it receives it, as wandb/tensorboard would send it."""

    def __init__(self):
        self.sent = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.sent.append(dict(logs))


def _trainer_with_reporters(out, callbacks=(), steps: int = 3):
    """A trainer whose ``report_to`` integrations (the Trainer's own ``get_reporting_integration_callbacks``)
    are a ``Reporter`` and transformers' own ``PrinterCallback`` (no wandb/tensorboard is installed here);
    the trailing progress printer is removed so that stdout shows what the integration slot printed."""
    import transformers.trainer as trainer_module
    from transformers.trainer_callback import PrinterCallback

    reporter = Reporter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            trainer_module,
            "get_reporting_integration_callbacks",
            lambda report_to: [reporter, PrinterCallback()],
        )
        trainer = grpo_trainer(out, callbacks=callbacks, steps=steps)
    trainer.callback_handler.callbacks.pop()  # the PrinterCallback disable_tqdm appends after user callbacks
    return trainer, reporter


@pytest.fixture(scope="module")
def attached_run(tmp_path_factory):
    """One run with ``attach`` ahead of the reporting integrations."""
    out = tmp_path_factory.mktemp("attached")
    trainer, reporter = _trainer_with_reporters(out)
    cb = attach(trainer, EntropyProbeCallback(EVAL_PROMPTS, every=2, group_size=4, max_new_tokens=4))
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("EntropyProbeCallback") < names.index("Reporter") < names.index("PrinterCallback")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.train()
    return trainer, cb, reporter, out, printed.getvalue()


def test_metrics_reach_log_history_reporters_and_the_jsonl(attached_run):
    trainer, cb, reporter, out, printed = attached_run
    assert [r["step"] for r in cb.records] == [1, 3]  # every=2: optimizer steps 0 and 2 (numbered 1 and 3)
    logged = {h["step"]: h for h in trainer.state.log_history if "entropy_probe/delta_h1" in h}
    assert sorted(logged) == [1, 3]
    for rec in cb.records:
        assert logged[rec["step"]]["entropy_probe/delta_h1"] == rec["delta_h1"]
        assert logged[rec["step"]]["entropy_probe/measured/delta_h"] == rec["measured/delta_h"]
    sent = [s for s in reporter.sent if "entropy_probe/delta_h1" in s]
    assert [s["entropy_probe/step"] for s in sent] == [1, 3]
    assert printed.count("'entropy_probe/delta_h1'") == 2  # transformers' PrinterCallback reported them
    lines = [json.loads(x) for x in (out / JSONL_NAME).read_text().splitlines()]
    assert lines == cb.records


def test_without_attach_the_reporters_get_the_metrics_too(tmp_path, capsys):
    """As ``callbacks=[cb]`` it starts after the reporters and moves itself ahead of them when training
    begins: log_history and the report_to integrations both get the metrics. max_new_tokens comes from
    the run's max_completion_length."""
    cb = EntropyProbeCallback(EVAL_PROMPTS[:2], group_size=2)
    trainer, reporter = _trainer_with_reporters(tmp_path, callbacks=[cb], steps=1)
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("Reporter") < names.index("EntropyProbeCallback")
    trainer.train()
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("EntropyProbeCallback") < names.index("Reporter") < names.index("PrinterCallback")
    assert any("entropy_probe/delta_h1" in h for h in trainer.state.log_history)
    assert any("entropy_probe/delta_h1" in s for s in reporter.sent)
    printed = capsys.readouterr().out
    assert "'loss'" in printed and "'entropy_probe/delta_h1'" in printed
    assert cb.max_new_tokens is None and trainer.args.max_completion_length == 4
    assert cb.records and cb.records[0]["taken/scale"] == 1.0
    assert cb.records[0]["taken/delta_h1"] == cb.records[0]["delta_h1"]


def test_a_repeated_run_starts_the_jsonl_afresh(tmp_path):
    for _ in range(2):  # the same output_dir twice: one record per step, not two
        cb = EntropyProbeCallback(EVAL_PROMPTS[:2], group_size=2, max_new_tokens=3)
        grpo_trainer(tmp_path, callbacks=[cb], steps=2).train()
    lines = [json.loads(x) for x in (tmp_path / JSONL_NAME).read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines == cb.records


BAD_ARGUMENTS = [
    ({"eval_prompts": None}, r"eval_prompts: give a non-empty list"),
    ({"eval_prompts": []}, r"eval_prompts: give a non-empty list"),
    ({"eval_prompts": "one prompt"}, r"eval_prompts: give a non-empty list"),
    ({"eval_prompts": ["ok", 3]}, r"eval_prompts\[1\]: a prompt must be"),
    ({"config": "optimizer-step"}, r"config must be an entropy_probe\.ProbeConfig"),
    ({"seed": "x"}, r"seed must be an integer"),
    ({"seed": True}, r"seed must be an integer"),
    ({"every": True}, r"every must be an integer >= 1"),
    ({"every": 0}, r"every must be an integer >= 1"),
    ({"group_size": 1}, r"group_size must be an integer >= 2"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be None or an integer"),
    ({"level": 2.0}, r"level must be in \(0, 1\)"),
    ({"level": True}, r"level must be in \(0, 1\)"),
    ({"entropy_budget": True}, r"EntropyGuard: max_drop"),
    ({"entropy_budget": -1.0}, r"EntropyGuard: max_drop"),
]


@pytest.mark.parametrize("change,match", BAD_ARGUMENTS, ids=[str(c) for c, _ in BAD_ARGUMENTS])
def test_every_argument_is_checked_when_built(change, match):
    kwargs = {"eval_prompts": EVAL_PROMPTS[:2], **change}
    with pytest.raises(ValueError, match=match):
        EntropyProbeCallback(**kwargs)


def _final_state(trainer) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        "opt": copy.deepcopy(trainer.optimizer.state_dict()),
        "rng": torch.get_rng_state(),
        "losses": [h.get("loss") for h in trainer.state.log_history],
    }


def test_trainer_trajectory_is_bit_identical_with_and_without_the_callback(tmp_path):
    runs = []
    for with_cb in (False, True):
        cbs = [EntropyProbeCallback(EVAL_PROMPTS, group_size=4, max_new_tokens=4)] if with_cb else []
        trainer = grpo_trainer(
            tmp_path / str(with_cb), callbacks=cbs, steps=3, loss_type="dapo", weight_decay=0.01
        )
        trainer.train()
        runs.append(_final_state(trainer))
    plain, probed = runs
    assert all(torch.equal(plain["params"][n], probed["params"][n]) for n in plain["params"])
    for k, st in plain["opt"]["state"].items():
        assert all(
            torch.equal(torch.as_tensor(v), torch.as_tensor(probed["opt"]["state"][k][f]))
            for f, v in st.items()
        ), k
    assert torch.equal(plain["rng"], probed["rng"]) and plain["losses"] == probed["losses"]


def test_prompts_are_tokenised_as_trl_tokenises_them(attached_run):
    trainer = attached_run[0]
    tok = word_tokenizer()
    chat = [{"role": "user", "content": "a b"}]
    for prompt in ("a b c", chat):
        ids, _, _ = trainer._tokenize_prompts([prompt])
        assert tokenise_prompt(tok, prompt) == list(ids[0])
    with pytest.raises(ValueError, match="EntropyProbeCallback.group_size must be an integer >= 2"):
        EntropyProbeCallback(EVAL_PROMPTS, group_size=1)
    with pytest.raises(ValueError, match="eval_prompts: a prompt must be a string or a list"):
        tokenise_prompt(tok, 3)


def test_the_example_runs(tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "trl_grpo.py"
    record = tmp_path / "record.json"  # --record: the run's figures as a docs/records/ record
    argv = ["trl_grpo.py", "--out", str(tmp_path), "--steps", "3", "--record", str(record)]
    monkeypatch.setattr(sys, "argv", argv)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(example), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    assert "3 steps in" in capsys.readouterr().out
    assert len((tmp_path / JSONL_NAME).read_text().splitlines()) == 3
    assert (tmp_path / "forecast_vs_measured.png").stat().st_size > 0
    doc = json.loads(record.read_text())
    rows = [json.loads(line) for line in (tmp_path / JSONL_NAME).read_text().splitlines()]
    assert doc["command"] == "python examples/" + " ".join(argv) and doc["data"]["steps"] == rows
    forecast, measured = (torch.tensor([r[k] for r in rows]) for k in ("delta_h1", "measured/delta_h"))
    corr = float(torch.corrcoef(torch.stack([forecast, measured]))[0, 1])
    assert doc["data"]["summary"]["steps"] == 3 and doc["data"]["summary"]["correlation"] == corr


def test_conversational_prompts_through_the_chat_template(tmp_path):
    chats = [{"prompt": [{"role": "user", "content": p}]} for p in EVAL_PROMPTS[:2]]  # dataset rows
    cb = EntropyProbeCallback(chats, group_size=3, max_new_tokens=3)
    grpo_trainer(tmp_path, callbacks=[cb], steps=1, conversational=True).train()
    (rec,) = cb.records
    assert rec["n_eval_units"] == 2 and rec["measured/ess"] > 1 and rec["delta_h1"] != 0
    batch_prompt = cb._prompt_ids[0]
    assert batch_prompt == tokenise_prompt(word_tokenizer(), chats[0]["prompt"])
    assert word_tokenizer().decode(batch_prompt).split()[-1] == "assistant:"  # the generation prompt
