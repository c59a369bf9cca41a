"""``EntropyProbeCallback``: the probe inside a Hugging Face ``Trainer`` (TRL ``GRPOTrainer``, ...).

    from entropy_probe.integrations.trl import EntropyProbeCallback, attach
    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    attach(trainer, EntropyProbeCallback(eval_prompts, every=1, group_size=8, max_new_tokens=64))
    trainer.train()   # entropy_probe/* in state.log_history, report_to and output_dir/entropy_probe.jsonl

Per probed optimizer step (docs/design.md section 15), with the ``Trainer``'s own events:

- ``on_pre_optimizer_step`` (after backward, accumulation and clipping, before ``optimizer.step()``):
  sample E, ``group_size`` responses to each held-out prompt from the current policy, pure
  ``softmax(logits / temperature)`` at the run's ``args.temperature`` (not the trainer's top-p/top-k),
  prompts tokenised with the trainer's ``processing_class`` (chat template for conversational
  prompts, as TRL does); then ``probe.run(eval_batch=E, from_grad=True)``: the forecast of the step
  the optimizer is about to take from the ``.grad`` the trainer left, whatever its loss.
- ``on_optimizer_step``: ``probe.measure_change(result)``, the change the real step caused on E.
- with ``entropy_budget``: after the forecast, ``EntropyGuard(entropy_budget, level).decide(result)``
  and the optimizer's lrs x ``decision.scale`` for the one ``optimizer.step()`` the Trainer takes next
  (``guard.applied``, entered on a held ``ExitStack``: the step happens between the two events); the
  lrs come back right after that step, before the scheduler's step, or in ``on_optimizer_step`` when
  no step was taken. Steps that are not probed (``every > 1``) are not guarded.
- ``on_log``: the flat ``entropy_probe/*`` metrics of the latest probed step join the next log (with
  ``logging_steps > 1`` a log carries the latest probed step; every probed step is in the JSON lines).

The Trainer appends each log to ``state.log_history`` before any ``on_log`` and calls the ``report_to``
integrations (wandb, tensorboard, ...) before callbacks passed as ``callbacks=[cb]``. The callback
writes its metrics into the log_history entry too, and at ``on_train_begin`` moves itself ahead of the
integrations (as ``attach(trainer, cb)`` does when called before training), so that they send the
metrics either way.

Logged per probed step: ``result.to_dict()`` (``delta_h1``: the forecast of the unscaled step), the
forecast of the step actually taken under ``taken/`` (``taken/delta_h1``, ``taken/lr``,
``taken/scale``: the guard's scale, 1 unguarded), ``measured/*`` and, with a budget, ``guard_*``.
``entropy_probe.jsonl`` starts afresh with a run that starts at step 0 (a resumed run appends).

The trainer's trajectory is unchanged: sampling is seeded and runs on a forked RNG, the probe restores
every RNG stream, mode, parameter, ``.grad`` and optimizer state (bit-identical with and without the
callback). Under DDP each rank samples its share of the prompts (``eval_prompts[rank::world_size]``)
and the ranks' probes combine their E units.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Sequence
from dataclasses import replace

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from ..config import ProbeConfig
from ..control import EntropyController
from ..from_grad import optimizer_lr
from ..guard import EntropyGuard
from ..probe import EntropyProbe
from ..result import PREFIX
from ..sampling import sample_rollouts
from . import eval_size
from .eval_size import EvalSize
from .trl_arguments import check_arguments, is_int

JSONL_NAME = "entropy_probe.jsonl"


class EntropyProbeCallback(TrainerCallback):
    """Forecast and measure the entropy change of every ``every``-th optimizer step on held-out prompts.

    eval_prompts: the held-out prompts: strings, or conversations (lists of ``{"role", "content"}``), or
        dataset rows ``{"prompt": ...}`` holding either; tokenised like TRL tokenises its prompts.
    every: probe optimizer steps 0, every, 2*every, ... (counted from 0 like ``state.global_step``). The
        overhead falls as 1/every (docs/performance.md: overhead against the SE it buys).
    max_eval_units: the prompts sampled per probed step (E units, ``group_size`` responses each). None:
        as many as one optimizer step of the trainer holds (GRPO: ``per_device_train_batch_size *
        gradient_accumulation_steps / num_generations``, times the ranks), so that the probe costs about
        one training step; at most ``len(eval_prompts)``. When it is smaller than ``len(eval_prompts)``
        the probed steps take consecutive slices of the list in turn (wrapping around), so every prompt
        is used. The E size and the ``se_cond_e`` it reached are in each record (``n_eval_units``,
        ``se_cond_e``).
    se_target: None (every probed step takes ``max_eval_units``), or the ``se_cond_e`` to aim for, in
        nats: from the second probed step on, E takes as few units as the previous probed step's per-unit
        SD says reach it at the current learning rate, between 2 and ``max_eval_units``
        (``eval_size``; the target is in each record as ``se_target``). With the token-level estimator
        (``ProbeConfig(entropy="token")``) a given SE needs fewer units than with "sequence".
    group_size: responses sampled per prompt (G >= 2).
    max_new_tokens: the longest sampled response; None: the run's ``args.max_completion_length``.
    config: the probe's options; default ``ProbeConfig(direction="optimizer-step")``, whose
        ``entropy="token"`` forecasts the ``entropy`` TRL logs (the mean full-vocabulary entropy over the
        batch's completion tokens; ``entropy="sequence"`` for the per-sequence functionals). Its temperature
        is replaced by the run's ``args.temperature`` (the policy the trainer differentiates).
    seed: sampling seed of step s on rank r is ``seed + s * world_size + r``.
    entropy_budget: None (observe only), or the guard's ``max_drop`` in nats: each probed step is shrunk
        so that its forecast entropy drop, at its ``level`` lower confidence bound, stays within it.
    level: the guard's one-sided confidence level, in (0, 1); the controller's interval level.
    entropy_target: None, or the controller's target (nats, or a schedule ``f(global_step) -> nats``):
        ``EntropyController(entropy_target, control_band, control_mode, level)`` decides each probed
        step (docs/control.md); not with ``entropy_budget``. "steer" keeps the halves of E in the probe.
    control_mode, control_band: the controller's mode ("scale" or "steer") and band (nats).
    control_entropy: the entropy now that the controller starts from: "probe" (``result.entropy``, the
        entropy of the held-out samples in the config's functional: with the default "token", TRL's own
        formula) or "trainer" (the trainer's latest logged ``entropy``, TRL's per-token entropy of the last
        training batch: the yardstick the target is usually set in).

    ``records``: one dict per probed step (what each JSON line holds), in order; a run that starts at
    step 0 starts them, and ``entropy_probe.jsonl``, afresh.

    Every argument is checked here (a ValueError naming it), not at the first probed step.
    """

    def __init__(
        self,
        eval_prompts: Sequence,
        every: int = 1,
        group_size: int = 8,
        max_new_tokens: int | None = None,
        config: ProbeConfig | None = None,
        seed: int = 0,
        entropy_budget: float | None = None,
        level: float = 0.95,
        max_eval_units: int | None = None,
        entropy_target=None,
        control_mode: str = "scale",
        control_band: float = 0.1,
        control_entropy: str = "probe",
        se_target: float | None = None,
    ):
        check_arguments(
            eval_prompts,
            every=every,
            group_size=group_size,
            max_new_tokens=max_new_tokens,
            config=config,
            seed=seed,
            budget=entropy_budget,
            level=level,
            max_eval_units=max_eval_units,
            se_target=se_target,
        )
        self.max_eval_units, self.se_target = max_eval_units, se_target
        self._size = EvalSize(max_eval_units, se_target)
        self.eval_prompts = [p["prompt"] if isinstance(p, dict) else p for p in eval_prompts]
        self.every, self.group_size, self.max_new_tokens, self.seed = every, group_size, max_new_tokens, seed
        self.config = config if config is not None else ProbeConfig(direction="optimizer-step")
        self.guard = EntropyGuard(entropy_budget, level) if entropy_budget is not None else None
        self.controller = None
        if entropy_target is not None:  # EntropyController checks target, band, mode (ValueError naming them)
            if self.guard is not None:
                raise ValueError(
                    "EntropyProbeCallback: give entropy_budget (guard) or entropy_target, not both"
                )
            self.controller = EntropyController(entropy_target, control_band, control_mode, level)
            if control_mode == "steer":
                self.config = replace(self.config, keep_halves=True)
        if control_entropy not in ("probe", "trainer"):
            raise ValueError(
                f"EntropyProbeCallback.control_entropy: 'probe' or 'trainer', got {control_entropy!r}"
            )
        self.control_entropy = control_entropy
        self._guarded: contextlib.ExitStack | None = None  # holds guard.applied across optimizer.step()
        self.records: list[dict] = []
        self._prompt_ids: list[list[int]] | None = None  # tokenised once
        self._pending = None  # (probe, result, step) between the two optimizer events
        self._unlogged: dict = {}  # metrics of the latest probed step, for the next on_log

    # ---- the Trainer's events ----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        """Ahead of the report_to integrations also when passed as ``callbacks=[cb]``; a fresh record for a
        run that starts at step 0 (a resumed run appends); max_new_tokens from the run's arguments."""
        _move_ahead_of_integrations(self)
        self._max_new_tokens(args)  # checked before the first step
        if state.global_step == 0:
            self.records = []
            if state.is_world_process_zero and os.path.exists(os.path.join(args.output_dir, JSONL_NAME)):
                os.remove(os.path.join(args.output_dir, JSONL_NAME))

    def on_pre_optimizer_step(
        self, args, state, control, model=None, processing_class=None, optimizer=None, **kwargs
    ):
        self._pending = None
        self._release_guard()  # a step whose on_optimizer_step never came (the Trainer raised)
        if state.global_step % self.every != 0:
            return
        rank, world = _rank_and_world()
        # a multimodal processor holds its tokenizer in .tokenizer
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        cfg = replace(self.config, temperature=float(getattr(args, "temperature", self.config.temperature)))
        lr = cfg.lr if cfg.lr is not None or optimizer is None else optimizer_lr(optimizer)
        prompts = self._step_prompts(self._tokenised(processing_class), args, state.global_step, lr)
        prompts = prompts[rank::world]
        eval_batch = None
        if prompts:
            eos = tokenizer.eos_token_id
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
            eval_batch = sample_rollouts(
                model,
                prompts,
                self.group_size,
                self._max_new_tokens(args),
                eos,
                reward_fn=None,
                temperature=cfg.temperature,
                pad_token_id=pad,
                seed=self.seed + state.global_step * world + rank,
            )
        # the Trainer hands callbacks the unwrapped model: the ranks combine through the default group
        probe = EntropyProbe(
            model, optimizer, cfg, process_group=torch.distributed.group.WORLD if world > 1 else None
        )
        result = probe.run(eval_batch=eval_batch, from_grad=True)
        self._size.observe(result.se_cond_e, result.n_eval_units, result.lr)  # the next step's E size
        decision = None
        if self.guard is not None or self.controller is not None:
            now = (model, state.global_step, self._entropy_now(state))
            decision = self._guard_step(optimizer, result, now)
        self._pending = (probe, result, decision, state.global_step + 1)  # step number once it is taken

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._release_guard()  # the post-step hook restored the lrs already; this covers a skipped step
        if self._pending is None:
            return
        probe, result, decision, step = self._pending
        self._pending = None
        guard_metrics, guard_record = {}, {}
        # the step taken was lr * scale * v: measured.se_diff is against that step's first-order forecast
        measured = probe.measure_change(result, step_scale=1.0 if decision is None else decision.scale)
        if decision is not None:
            guard_metrics, guard_record = self._decision_metrics(decision, measured)
        metrics = {
            f"{PREFIX}step": step,
            **result.to_dict(),
            **_taken(result, 1.0 if decision is None else decision.scale),
            **measured.to_dict(),
            **guard_metrics,
            **({} if self.se_target is None else {f"{PREFIX}se_target": self.se_target}),
        }
        metrics = {k: v for k, v in metrics.items() if v is not None}  # se_total: None without a U batch
        # the metrics carry reliable and prediction/* (numbers only); the record also names the method
        method = {} if result.prediction is None else {"prediction_method": result.prediction.method}
        self.records.append({**{k[len(PREFIX) :]: v for k, v in metrics.items()}, **guard_record, **method})
        self._unlogged = metrics
        if state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, JSONL_NAME), "a") as f:
                f.write(json.dumps(self.records[-1]) + "\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._unlogged or logs is None:
            return
        logs.update(self._unlogged)
        # The Trainer appended a copy of ``logs`` to log_history before calling on_log: update that copy.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._unlogged)
        self._unlogged = {}

    # ---- helpers -----------------------------------------------------------------------------------
    def _max_new_tokens(self, args) -> int:
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        length = getattr(args, "max_completion_length", None)
        if not (is_int(length) and length >= 1):
            raise ValueError(
                "EntropyProbeCallback.max_new_tokens is None and the trainer's args have no "
                f"max_completion_length (got {length!r}): pass max_new_tokens"
            )
        return length

    def _decision_metrics(self, decision, measured) -> tuple[dict, dict]:
        """(numbers for the logs, names for the record) of a guard's or the controller's decision."""
        if self.controller is not None:
            after = {f"{PREFIX}control/measured": decision.entropy + measured.delta_h}  # H after, on E
            return {**decision.to_dict(), **after}, {
                "control_reason": decision.reason,
                "control_mode": decision.mode,
            }
        gap = {f"{PREFIX}guard_measured_minus_forecast": measured.delta_h - decision.forecast}
        return {**decision.to_dict(), **gap}, {"guard_reason": decision.reason, "guard_order": decision.order}

    def _entropy_now(self, state) -> float | None:
        """The trainer's latest logged entropy with ``control_entropy="trainer"`` (None: the probe's)."""
        if self.control_entropy != "trainer":
            return None
        logged = [h["entropy"] for h in state.log_history if "entropy" in h]
        return float(logged[-1]) if logged else None

    def _guard_step(self, optimizer, result, model_step=(None, None, None)):
        """Decide (guard or controller); hold ``applied`` open until ``on_optimizer_step`` (the step in
        between). ``model_step``: the model, the global step and the entropy now (for the controller)."""
        if optimizer is None:
            raise ValueError("EntropyProbeCallback: the trainer passed no optimizer to guard or control")
        if self.controller is not None:
            model, step, entropy = model_step
            decision = self.controller.decide(result, step, entropy, model=model, optimizer=optimizer)
            applied = self.controller.applied(optimizer, decision)
        else:
            decision = self.guard.decide(result)
            applied = self.guard.applied(optimizer, decision)
        stack = contextlib.ExitStack()
        stack.enter_context(applied)
        self._guarded = stack
        return decision

    def _release_guard(self) -> None:
        if self._guarded is not None:
            stack, self._guarded = self._guarded, None
            stack.close()

    def eval_units(self, args, lr: float | None = None) -> int:
        """The number of prompts sampled per probed step at learning rate ``lr``: ``max_eval_units`` (or
        the trainer's own), fewer where ``se_target`` allows (``eval_size.EvalSize``)."""
        return self._size.units(args, len(self.eval_prompts), lr, _rank_and_world()[1])

    def _step_prompts(self, prompts: list, args, global_step: int, lr: float | None = None) -> list:
        """This probed step's slice of the prompts: consecutive ones, wrapping around the list (the k-th
        probed step takes the k-th slice when every slice has the same size)."""
        m = self.eval_units(args, lr)
        return [prompts[i] for i in self._size.step_slice(len(prompts), m, global_step // self.every)]

    def _tokenised(self, processing_class) -> list[list[int]]:
        if self._prompt_ids is None:
            if processing_class is None:
                raise ValueError(
                    "EntropyProbeCallback: the trainer has no processing_class to tokenise eval_prompts"
                )
            self._prompt_ids = [tokenise_prompt(processing_class, p) for p in self.eval_prompts]
        return self._prompt_ids


def tokenise_prompt(processing_class, prompt) -> list[int]:
    """A prompt's token ids as TRL's ``GRPOTrainer`` makes them: the chat template with the generation
    prompt for a conversation, the tokenizer's own call (special tokens included) for a string."""
    if isinstance(prompt, str):
        return list(processing_class(text=[prompt])["input_ids"][0])
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        out = processing_class.apply_chat_template(
            conversation=[prompt], add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(out["input_ids"][0])
    raise ValueError(
        f"EntropyProbeCallback.eval_prompts: a prompt must be a string or a list of "
        f"{{'role', 'content'}} messages, got {type(prompt).__name__}"
    )


def trainer_prompts_per_step(args) -> int | None:
    """Prompts in one optimizer step of a TRL ``GRPOTrainer`` over all ranks (``eval_size``)."""
    return eval_size.trainer_prompts_per_step(args, _rank_and_world()[1])


def _taken(result, scale: float) -> dict:
    """The first-order forecast of the step actually taken (at ``scale`` x lr when guarded), under its own
    names; ``delta_h1`` keeps the forecast of the unscaled step."""
    return {
        f"{PREFIX}taken/scale": scale,
        f"{PREFIX}taken/lr": result.lr * scale,
        f"{PREFIX}taken/delta_h1": result.delta_h1 * scale,
        f"{PREFIX}taken/se_cond_e": result.se_cond_e * scale,
    }


def _move_ahead_of_integrations(callback) -> None:
    """``callbacks=[cb]`` puts the callback after the report_to integrations, which would send each log
    before it adds its metrics. The Trainer hands callbacks no reference to itself or to its handler, so
    the handler's list is found among the callback's referrers; moving the callback to an earlier place
    during ``on_train_begin`` leaves the positions after it, still to be visited, unchanged."""
    for ref in gc.get_referrers(callback):
        if isinstance(ref, list) and any(isinstance(cb, DefaultFlowCallback) for cb in ref):
            if all(isinstance(cb, TrainerCallback) for cb in ref):
                _reorder(ref, callback)


def _reorder(callbacks: list, callback) -> None:
    """``callback`` right after ``DefaultFlowCallback``: ahead of the integrations and the printer."""
    if callback in callbacks:
        callbacks.remove(callback)
    at = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
    callbacks.insert(at, callback)


def attach(trainer, callback: EntropyProbeCallback) -> EntropyProbeCallback:
    """Add ``callback`` to ``trainer`` ahead of its ``report_to`` integrations and progress printer (right
    after ``DefaultFlowCallback``), so that they send the ``entropy_probe/*`` metrics it adds to each log."""
    _reorder(trainer.callback_handler.callbacks, callback)
    return callback


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
