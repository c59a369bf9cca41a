"""verl's PPO/GRPO trainer with the entropy probe on the actor: ``run_ppo`` with ``ProbedTaskRunner``.

    bash examples/verl_grpo/run_grpo.sh        # the overrides of overrides.txt; needs GPUs, Ray and vLLM

The config is verl 0.9.1's own ``ppo_trainer.yaml`` (composed by hydra exactly as ``verl.trainer.main_ppo``
does) plus the probe's block ``actor_rollout_ref.entropy_probe`` (``entropy_probe.integrations.verl_config``).
The actor must use FSDP2 (``actor_rollout_ref.actor.strategy=fsdp2``).
"""

from pathlib import Path

import hydra
import verl
from verl.trainer.main_ppo import run_ppo

from entropy_probe.integrations.verl_ray import ProbedTaskRunner

VERL_CONFIG = str(Path(verl.__file__).parent / "trainer" / "config")


@hydra.main(config_path=VERL_CONFIG, config_name="ppo_trainer", version_base=None)
def main(config):
    probe = config.actor_rollout_ref.get("entropy_probe")
    if probe is not None and probe.get("prompts_file"):  # Ray workers do not start in this directory
        probe.prompts_file = str(Path(probe.prompts_file).resolve())
    run_ppo(config, task_runner_class=ProbedTaskRunner)


if __name__ == "__main__":
    main()
