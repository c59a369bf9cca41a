"""The Ray path: verl's PPO/GRPO trainer with the probe on the actor's FSDP2 engine.

    from verl.trainer.main_ppo import run_ppo
    from entropy_probe.integrations.verl_ray import ProbedTaskRunner
    run_ppo(config, task_runner_class=ProbedTaskRunner)   # config with actor_rollout_ref.entropy_probe

``ProbedTaskRunner`` is verl 0.9.1's ``main_ppo_v0.TaskRunner`` (``RayPPOTrainer``) with the actor worker
replaced by ``ProbedActorRolloutRefWorker``: verl's ``ActorRolloutRefWorker`` that, once its models are
built, attaches the probe to ``self.actor.engine`` on every actor rank as ``actor_rollout_ref.entropy_probe``
says (``verl_config``). The probe's metrics then reach verl's logger as ``actor/entropy_probe/...``.
FSDP1 is refused before any model is built. See examples/verl_grpo and docs/verl.md.

This module needs verl's full runtime (Ray, a rollout engine such as vLLM and what it pulls in) and GPUs:
it is not run by the tests here. Everything it calls is: ``attach_from_config`` on verl's real engine.
"""

from __future__ import annotations

import ray
from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer.main_ppo_v0 import TaskRunner
from verl.trainer.ppo.ray_trainer import Role
from verl.workers.engine_workers import ActorRolloutRefWorker

from .verl_config import attach_from_config, check_actor_strategy, probe_settings


class ProbedActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's actor/rollout/ref worker with the probe attached to the actor's engine."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self):
        if self._is_actor and probe_settings(self.config) is not None:
            check_actor_strategy(self.config)  # before building anything
        super().init_model()
        self.entropy_probe = None
        if self._is_actor:
            tokenizer = self.actor.model_config.tokenizer
            self.entropy_probe = attach_from_config(self.actor.engine, self.config, tokenizer)


# ray.remote wraps a class into an actor class that cannot be subclassed; verl keeps the original class on
# the actor class's metadata.
_TaskRunner = TaskRunner.__ray_metadata__.modified_class.__ray_actor_class__


class _ProbedTaskRunner(_TaskRunner):
    def add_actor_rollout_worker(self, config):
        _, worker_group_cls = super().add_actor_rollout_worker(config)
        for role in (Role.ActorRollout, Role.ActorRolloutRef):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(ProbedActorRolloutRefWorker)
        return ProbedActorRolloutRefWorker, worker_group_cls


ProbedTaskRunner = ray.remote(num_cpus=1)(_ProbedTaskRunner)
