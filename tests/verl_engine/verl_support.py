"""Test support for verl 0.9.1 on the CPU: a tiny random Qwen2 on disk, verl's real FSDP2 engine around
it, and rollouts in verl's own ``DataProto`` layout fed to the engine the way verl's PPO trainer does.

Nothing of verl is replaced: the engine is ``FSDPEngineWithLMHead`` (FSDP2 ``fully_shard``, AdamW, its
gradient clipping and non-finite-step skip), the loss is verl's ``ppo_loss``, the batch goes through
verl's ``left_right_2_no_padding``. What the CPU needs: the platform of ``cpu_platform``, gloo,
``attn_implementation="eager"``, ``use_torch_compile=False``, ``load_tokenizer=False``, fp32 (no bf16
mixed precision: the trajectories are compared bit for bit).
"""

from __future__ import annotations

import os
import socket
import uuid
from functools import partial
from pathlib import Path

import numpy as np
import torch
from cpu_platform import use_cpu_platform

torch.set_num_threads(1)  # 2 cores shared by the test processes: more threads are much slower here
use_cpu_platform()  # before verl.workers.engine is imported: transformer_impl reads the device at import

from tensordict import TensorDict  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig  # noqa: E402
from verl.workers.config.actor import FSDPActorConfig  # noqa: E402
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

VOCAB, EOS, PAD = 48, 1, 0
TEMPERATURE = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo() -> tuple[int, int]:
    """(rank, world): the gloo group of torchrun's environment, or a one-process group."""
    if not torch.distributed.is_initialized():
        if "RANK" in os.environ:  # torchrun
            torch.distributed.init_process_group("gloo")
        else:
            url = f"tcp://127.0.0.1:{free_port()}"
            torch.distributed.init_process_group("gloo", init_method=url, rank=0, world_size=1)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def tiny_qwen2(path: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 with random weights, saved where verl's ``HFModelConfig(path=...)`` reads it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").exists():
        return path
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=EOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # a peaked policy: entropy moves visibly in a few steps
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    return path


def engine_configs(model_dir: Path, strategy: str = "fsdp2", lr: float = 2e-3, steps: int = 100):
    """verl's own config objects for the actor engine on the CPU."""
    model = HFModelConfig(
        path=str(model_dir),
        load_tokenizer=False,
        override_config={"attn_implementation": "eager"},
        use_remove_padding=False,
        enable_gradient_checkpointing=False,
    )
    engine = FSDPEngineConfig(
        strategy=strategy,
        use_torch_compile=False,
        model_dtype="fp32",
        mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"},
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=4,
        use_remove_padding=False,
        seed=0,
    )
    optim = FSDPOptimizerConfig(lr=lr, clip_grad=1.0, total_training_steps=steps, weight_decay=0.01)
    return model, engine, optim


def build_engine(model_dir: Path, strategy: str = "fsdp2", lr: float = 2e-3) -> FSDPEngineWithLMHead:
    model, engine_cfg, optim = engine_configs(model_dir, strategy, lr)
    engine = FSDPEngineWithLMHead(model, engine_cfg, optim, CheckpointConfig())
    engine.initialize()
    return engine


def actor_loss(engine: FSDPEngineWithLMHead):
    """verl's ``ppo_loss`` with GRPO's settings (token-mean, clip 0.2, no KL, no entropy bonus)."""
    actor = FSDPActorConfig(
        strategy="fsdp2",
        ppo_mini_batch_size=8,
        ppo_micro_batch_size_per_gpu=4,
        use_kl_loss=False,
        rollout_n=4,
    )
    return partial(ppo_loss, actor)


def rollout_dataproto(prompts: list[list[int]], group: int, resp_len: int, seed: int) -> DataProto:
    """GRPO rollouts as verl's trainer holds them: ``prompts`` left-padded, ``responses`` right-padded
    (cut after EOS), ``attention_mask``, ``position_ids``, ``response_mask``, one ``uid`` per prompt,
    ``token_level_rewards`` and group-normalised ``advantages`` (the same on every response token)."""
    gen = torch.Generator().manual_seed(seed)
    n, width = len(prompts) * group, max(len(p) for p in prompts)
    prompt_ids = torch.full((n, width), PAD, dtype=torch.long)
    prompt_mask = torch.zeros((n, width), dtype=torch.long)
    for row in range(n):
        p = prompts[row // group]
        prompt_ids[row, width - len(p) :], prompt_mask[row, width - len(p) :] = torch.tensor(p), 1
    responses = torch.randint(2, VOCAB, (n, resp_len), generator=gen)
    lengths = torch.randint(2, resp_len + 1, (n,), generator=gen)
    resp_mask = (torch.arange(resp_len)[None, :] < lengths[:, None]).long()  # (n, L)
    responses[torch.arange(n), lengths - 1] = EOS
    responses = torch.where(resp_mask.bool(), responses, PAD)
    attention = torch.cat([prompt_mask, resp_mask], dim=1)
    rewards = (responses == 7).any(dim=1).float() + 0.1 * lengths.float()  # (n,)
    level = torch.zeros((n, resp_len))
    level[torch.arange(n), lengths - 1] = rewards
    grouped = rewards.view(-1, group)
    adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-6)).view(-1)
    uids = np.repeat(np.array([str(uuid.UUID(int=seed * 1000 + i)) for i in range(len(prompts))]), group)
    batch = TensorDict(
        {
            "prompts": prompt_ids,
            "responses": responses,
            "input_ids": torch.cat([prompt_ids, responses], dim=1),
            "attention_mask": attention,
            "position_ids": (attention.cumsum(1) - 1).clamp_min(0),
            "response_mask": resp_mask,
            "token_level_rewards": level,
            "advantages": adv[:, None] * resp_mask,
        },
        batch_size=[n],
    )
    return DataProto(batch=batch, non_tensor_batch={"uid": uids.astype(object)})


def train_step(engine: FSDPEngineWithLMHead, data: DataProto, loss_fn) -> dict:
    """One verl actor update on ``data`` (this rank's share), as ``RayPPOTrainer._update_actor`` feeds the
    engine: ``old_log_probs`` from the engine's own forward, padding removed, verl's non-tensor keys."""
    td = left_right_2_no_padding(data.to_tensordict())
    common = dict(
        use_remove_padding=False,
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=4,
        use_fused_kernels=False,
        temperature=TEMPERATURE,
        pad_token_id=PAD,
    )
    tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False, **common)
    with engine.eval_mode():
        out = engine.infer_batch(td)
    td["old_log_probs"] = no_padding_2_padding(out["model_output"]["log_probs"], td)  # (n, L)
    world = torch.distributed.get_world_size()
    tu.assign_non_tensor(td, global_batch_size=len(data) * world, compute_loss=True)
    with engine.train_mode():
        return engine.train_batch(td, loss_function=loss_fn)
