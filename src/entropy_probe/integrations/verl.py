"""The probe inside verl's FSDP2 training engine (``FSDPEngineWithLMHead``), docs/design.md section 18.

    from entropy_probe.integrations.verl import HeldOutPrompts, attach
    probe = attach(engine, HeldOutPrompts(prompt_ids, group_size=8, max_new_tokens=256, eos_token_id=eos),
                   every=1, config=ep.ProbeConfig(direction="optimizer-step", temperature=1.0))
    engine.train_batch(data, loss_function)   # metrics["entropy_probe/..."] on every probed step

Tested with verl 0.9.1 (``pip install entropy-probe[verl]``), whose API is young: pin it. Per optimizer
step, through the torch optimizer's own step hooks (``register_step_pre_hook`` / ``_post_hook``):

- pre-step (after verl's backward, micro-batch accumulation and gradient clipping; verl skips the whole
  step, hooks included, when the gradient norm is not finite): E from ``eval_source``, then
  ``probe.run(eval_batch=E, from_grad=True)``, the forecast of the step the optimizer is about to take
  from the ``.grad`` verl left, whatever its loss (PPO clip, KL, entropy bonus, Clip-Cov, ...);
- post-step: ``probe.measure_change(result)``, the change the real step caused on the same E;
- ``engine.train_batch`` (wrapped on this engine only) returns the probe's numeric metrics in its
  ``metrics``, as verl ``Metric`` objects (averaged over data-parallel ranks like verl's own; they are
  equal on every rank); verl's trainer logs them as ``actor/entropy_probe/...``.

``eval_source`` is either ``HeldOutPrompts`` (sampled on-policy with Hugging Face ``generate`` from the
FSDP2 model itself, on every rank, ``synced_gpus`` on 2+ ranks), or E handed in by the caller: a
``RolloutBatch`` or ``f(step) -> RolloutBatch`` (for example from verl's rollout manager on held-out
prompts, converted by ``dataproto_to_rollout_batch``; vLLM/SGLang sample from a slightly different
policy than the FSDP model the probe differentiates: bf16 weights, other kernels, top-p/top-k). Every
rank must hold E units (FSDP2 runs E in lock-step).

``guard``: an ``EntropyGuard`` (or any object with its ``decide(result)`` and ``applied(optimizer,
decision)``): each probed step's lr is scaled by ``decision.scale`` for that one step.

The trajectory is unchanged: sampling runs on a forked, seeded RNG; the probe restores parameters,
``.grad``, optimizer state, RNG streams and train/eval mode (bit-identical with and without it).
verl's FSDP1 (``strategy: fsdp``, its default) is refused: set ``actor.strategy=fsdp2``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import fsdp
from ..batch import RolloutBatch
from ..config import ProbeConfig
from ..probe import EntropyProbe
from ..result import PREFIX
from ..sampling import sample_rollouts
from .verl_batch import dataproto_to_rollout_batch

__all__ = ["EngineProbe", "HeldOutPrompts", "attach", "check_strategy", "dataproto_to_rollout_batch"]


@dataclass
class HeldOutPrompts:
    """E sampled on-policy from the FSDP2 model at each probed step: ``group_size`` responses to each prompt.

    prompt_ids: the held-out prompts as token id lists (tokenise them as verl's dataset does, chat
        template included); rank r of W samples ``prompt_ids[r::W]``, so give at least W prompts.
    seed: the sampling seed of optimizer step s on rank r is ``seed + s * W + r``.
    """

    prompt_ids: Sequence[Sequence[int]]
    group_size: int = 8
    max_new_tokens: int = 256
    eos_token_id: int = 0
    pad_token_id: int | None = None
    seed: int = 0

    def check(self, world: int) -> None:
        """A ValueError (on every rank alike) when some rank would get no prompt."""
        if len(self.prompt_ids) < world:
            raise ValueError(
                f"HeldOutPrompts.prompt_ids: {len(self.prompt_ids)} prompt(s) for {world} ranks; every rank "
                "needs at least one (FSDP2 runs E on all ranks in lock-step)"
            )

    def sample(self, module: torch.nn.Module, step: int, temperature: float) -> RolloutBatch:
        rank, world = _rank_and_world()
        self.check(world)
        mine = list(self.prompt_ids)[rank::world]
        try:
            return sample_rollouts(
                module, mine, self.group_size, self.max_new_tokens, self.eos_token_id, reward_fn=None,
                temperature=temperature, seed=self.seed + step * world + rank,
                pad_token_id=self.pad_token_id, synced_gpus=world > 1,
            )  # fmt: skip
        finally:
            fsdp.reshard(module)  # generate's last forward leaves the FSDP2 root gathered


def check_strategy(engine) -> None:
    """A ValueError unless ``engine`` is verl's FSDP2 engine (``strategy: fsdp2``)."""
    strategy = getattr(getattr(engine, "engine_config", None), "strategy", None)
    if strategy != "fsdp2":
        raise ValueError(
            f"entropy_probe.integrations.verl: the engine's strategy is {strategy!r}; the probe supports "
            "verl's FSDP2 engine only: set actor.strategy=fsdp2 (verl's default 'fsdp' is FSDP1)"
        )
    if getattr(engine, "optimizer", None) is None:
        raise ValueError(
            "entropy_probe.integrations.verl: the engine has no optimizer (forward_only engine?)"
        )
    fsdp.fsdp2_group(engine.module)  # every trainable parameter sharded by fully_shard, else a ValueError


class EngineProbe:
    """The probe attached to one verl engine; ``records`` holds one dict per probed step."""

    def __init__(self, engine, eval_source, every: int = 1, config: ProbeConfig | None = None, guard=None):
        check_strategy(engine)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"attach: every must be an integer >= 1, got {every!r}")
        if not (isinstance(eval_source, (HeldOutPrompts, RolloutBatch)) or callable(eval_source)):
            raise ValueError(
                "attach: eval_source must be HeldOutPrompts, a RolloutBatch or a callable "
                f"step -> RolloutBatch, got {type(eval_source).__name__}"
            )
        if isinstance(eval_source, HeldOutPrompts):
            eval_source.check(_rank_and_world()[1])  # at attach, not in a collective where ranks would hang
        self.engine, self.eval_source, self.every, self.guard = engine, eval_source, every, guard
        self.config = config if config is not None else ProbeConfig(direction="optimizer-step")
        self.probe = EntropyProbe(engine.module, engine.optimizer, self.config)
        self.records: list[dict] = []
        self.steps = 0  # optimizer steps taken so far (a step verl skips as non-finite is not counted)
        self._pending = None  # (result, decision) between the two step hooks
        self._metrics: dict = {}  # of the probed steps since the last train_batch returned
        self._guarded: contextlib.ExitStack | None = None
        self._handles = [
            engine.optimizer.register_step_pre_hook(self._before_step),
            engine.optimizer.register_step_post_hook(self._after_step),
        ]
        self._train_batch = engine.train_batch  # the bound method of the engine's class
        engine.train_batch = self._train_batch_with_metrics

    def detach(self) -> None:
        """Remove the hooks and the ``train_batch`` wrapper; the engine is as before ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._release_guard()
        if self.engine.__dict__.get("train_batch") == self._train_batch_with_metrics:
            del self.engine.train_batch

    # ---- the optimizer's step hooks ---------------------------------------------------------------
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._pending = None
        self._release_guard()
        if self.steps % self.every != 0:
            return
        eval_batch = self._eval_batch(self.steps)
        with torch.enable_grad():  # whatever verl's caller set: the probe differentiates
            result = self.probe.run(eval_batch=eval_batch, from_grad=True)
        decision = None
        if self.guard is not None:
            decision = self.guard.decide(result)
            self._guarded = contextlib.ExitStack()
            self._guarded.enter_context(self.guard.applied(optimizer, decision))  # lr x scale, this step
        self._pending = (result, decision)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self._pending is None:
            return
        result, decision = self._pending
        self._pending = None
        # the step taken was lr * scale * v: measured.se_diff is against that step's first-order forecast
        measured = self.probe.measure_change(result, step_scale=1.0 if decision is None else decision.scale)
        metrics = {f"{PREFIX}step": self.steps, **result.to_dict(), **measured.to_dict()}
        if decision is not None:
            metrics.update(decision.to_dict())
            metrics[f"{PREFIX}guard_measured_minus_forecast"] = measured.delta_h - decision.forecast
        metrics = numeric(metrics)
        self.records.append({k[len(PREFIX) :]: v for k, v in metrics.items()})
        for key, value in metrics.items():
            self._metrics.setdefault(key, []).append(value)

    # ---- engine.train_batch, with the probe's metrics --------------------------------------------
    def _train_batch_with_metrics(self, data, loss_function):
        self._metrics = {}
        try:
            outputs = self._train_batch(data, loss_function)
        finally:
            self._release_guard()  # the post-step hook restored the lrs; this also covers a skipped step
        if self._metrics and isinstance(outputs, dict) and isinstance(outputs.get("metrics"), dict):
            from verl.utils.metric.utils import Metric

            for key, values in self._metrics.items():
                outputs["metrics"][key] = metric = Metric("mean")
                metric.extend(values)  # one value per probed step
        self._metrics = {}
        return outputs

    # ---- helpers -------------------------------------------------------------------------------------
    def _eval_batch(self, step: int) -> RolloutBatch:
        source = self.eval_source
        if isinstance(source, HeldOutPrompts):
            return source.sample(self.engine.module, step, self.config.temperature)
        batch = source if isinstance(source, RolloutBatch) else source(step)
        if not isinstance(batch, RolloutBatch):
            raise ValueError(
                f"attach: eval_source({step}) returned {type(batch).__name__}, expected a RolloutBatch "
                "(dataproto_to_rollout_batch converts verl's DataProto)"
            )
        return batch

    def _release_guard(self) -> None:
        if self._guarded is not None:
            stack, self._guarded = self._guarded, None
            stack.close()


def attach(engine, eval_source, every: int = 1, config: ProbeConfig | None = None, guard=None) -> EngineProbe:
    """Probe every ``every``-th optimizer step of verl's FSDP2 ``engine`` on E from ``eval_source``.

    config: the probe's options; default ``ProbeConfig(direction="optimizer-step")``, whose
        ``entropy="token"`` forecasts what verl logs as ``actor/entropy`` (token-mean aggregation). Its
        ``temperature`` must be the rollout temperature verl trains at
        (``actor_rollout_ref.rollout.temperature``).
    Call it on every rank, after ``engine.initialize()``; ``EngineProbe.detach()`` undoes it.
    """
    return EngineProbe(engine, eval_source, every, config, guard)


def numeric(metrics: dict) -> dict:
    """The numbers and booleans of ``metrics``: verl averages every metric it is handed, and a None (no U
    batch: ``se_total``) or a string would break that."""
    return {k: v for k, v in metrics.items() if isinstance(v, (bool, int, float))}


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
