"""The Ray path below the point where it needs GPUs: verl's own hydra config (``ppo_trainer.yaml``) with the
probe's block, ``attach_from_config`` on verl's real FSDP2 engine, the refusal of FSDP1 from the config,
and ``ProbedTaskRunner`` putting ``ProbedActorRolloutRefWorker`` in verl's role mapping. Running
``run_ppo`` itself needs Ray workers with GPUs and a rollout engine (vLLM): not done here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import verl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl_support import PAD, build_engine, init_gloo, rollout_dataproto, tiny_qwen2, train_step
from verl_support import actor_loss as make_loss

from entropy_probe.integrations.verl_config import attach_from_config, check_actor_strategy, probe_settings

VERL_CONFIG = Path(verl.__file__).parent / "trainer" / "config"
PROBE = [
    "+actor_rollout_ref.entropy_probe.prompt_ids=[[14,15],[16,17,18]]",
    "+actor_rollout_ref.entropy_probe.group_size=4",
    "+actor_rollout_ref.entropy_probe.max_new_tokens=5",
    "+actor_rollout_ref.entropy_probe.eos_token_id=1",
    f"+actor_rollout_ref.entropy_probe.pad_token_id={PAD}",
    "+actor_rollout_ref.entropy_probe.entropy_budget=0.01",
]


def verl_config(*overrides: str):
    """verl 0.9.1's own PPO trainer config, composed by hydra as ``main_ppo`` does, with ``overrides``."""
    with initialize_config_dir(config_dir=str(VERL_CONFIG), version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


@pytest.fixture(scope="module")
def config():
    return verl_config(
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.rollout.temperature=1.0", *PROBE
    )


def test_fsdp1_config_is_refused_naming_the_setting():
    default = verl_config(*PROBE).actor_rollout_ref  # verl's default strategy: fsdp (FSDP1)
    assert default.actor.strategy == "fsdp"
    with pytest.raises(ValueError, match=r"actor\.strategy=fsdp2"):
        check_actor_strategy(default)
    with pytest.raises(ValueError, match=r"actor\.strategy=fsdp2"):
        attach_from_config(object(), default)


def test_probe_settings_are_checked(config):
    assert probe_settings(verl_config().actor_rollout_ref) is None  # no block: no probe
    settings = probe_settings(config.actor_rollout_ref)
    assert settings["prompt_ids"] == [[14, 15], [16, 17, 18]] and settings["entropy_budget"] == 0.01
    with pytest.raises(ValueError, match="unknown setting"):
        probe_settings(OmegaConf.create({"entropy_probe": {"prompt_ids": [[3]], "evry": 2}}))
    with pytest.raises(ValueError, match="exactly one of prompts_file and prompt_ids"):
        probe_settings(OmegaConf.create({"entropy_probe": {"every": 2}}))


def test_attach_from_config_probes_the_real_engine(config, tmp_path):
    init_gloo()
    engine = build_engine(tiny_qwen2(tmp_path / "qwen2"))
    probe = attach_from_config(engine, config.actor_rollout_ref)
    assert probe.config.temperature == 1.0 and probe.config.direction == "optimizer-step"
    assert probe.config.entropy == "token"  # the block's default
    assert probe.guard is not None and probe.guard.max_drop == 0.01
    out = train_step(engine, rollout_dataproto([[3, 4, 5], [6, 7]], 4, 6, seed=0), make_loss(engine))
    (record,) = probe.records
    assert record["n_eval_units"] == 2 and 0 < record["guard_scale"] <= 1
    assert float(out["metrics"]["entropy_probe/delta_h1"].aggregate()) == pytest.approx(record["delta_h1"])
    probe.detach()


def test_task_runner_puts_the_probed_worker_in_the_role_mapping(config):
    import ray
    from verl.trainer.ppo.ray_trainer import Role

    from entropy_probe.integrations.verl_ray import (
        ProbedActorRolloutRefWorker,
        ProbedTaskRunner,
        _ProbedTaskRunner,
    )

    assert isinstance(ProbedTaskRunner, ray.actor.ActorClass)
    runner = _ProbedTaskRunner()
    worker_cls, _ = runner.add_actor_rollout_worker(config)
    assert worker_cls is ProbedActorRolloutRefWorker
    (role,) = runner.role_worker_mapping
    assert role in (Role.ActorRollout, Role.ActorRolloutRef)
    remote = runner.role_worker_mapping[role]
    assert remote.__ray_metadata__.modified_class.__ray_actor_class__ is ProbedActorRolloutRefWorker
    # verl dispatches init_model to every worker only if the override keeps its registration
    from verl.single_controller.base.decorator import MAGIC_ATTR

    assert getattr(ProbedActorRolloutRefWorker.init_model, MAGIC_ATTR)["dispatch_mode"].name == "ONE_TO_ALL"


def test_the_example_config_composes_with_verl_and_the_probe():
    """examples/verl_grpo/overrides.txt (what run_grpo.sh passes) is a valid override set of verl 0.9.1's
    own config, trains the actor with FSDP2 and holds a valid probe block whose prompts load."""
    root = Path(__file__).resolve().parents[2]
    lines = (root / "examples" / "verl_grpo" / "overrides.txt").read_text().splitlines()
    config = verl_config(*[line for line in lines if line and not line.startswith("#")])
    actor_rollout_ref = config.actor_rollout_ref
    check_actor_strategy(actor_rollout_ref)
    assert config.algorithm.adv_estimator == "grpo"
    settings = probe_settings(actor_rollout_ref)
    prompts = json.loads((root / settings["prompts_file"]).read_text())
    assert len(prompts) == 8 and all(p[0]["role"] == "user" for p in prompts)
