#!/usr/bin/env bash
# verl GRPO with the entropy probe on the actor: 8 GPUs, Ray, vLLM (pip install "entropy-probe[verl]" vllm).
# Not runnable on a CPU machine; tests/verl_engine covers everything below Ray on verl's real engine.
# Extra hydra overrides go after the script, e.g. trainer.n_gpus_per_node=4.
set -euo pipefail
cd "$(dirname "$0")/../.."
mapfile -t OVERRIDES < <(grep -v '^#' examples/verl_grpo/overrides.txt | grep -v '^$')
python examples/verl_grpo/run_grpo.py "${OVERRIDES[@]}" "$@"
