"""The entropy probe inside an FSDP2 (``fully_shard``) GRPO loop: parameters, gradients, Adam state sharded.

Run (CPU: gloo; GPUs: nccl, one process per GPU; the same command either way):

    torchrun --nproc_per_node=2 examples/fsdp_probe.py            # installed package
    PYTHONPATH=src torchrun --nproc_per_node=2 examples/fsdp_probe.py   # from a checkout

Each step, every rank samples its own prompts and responses from a tiny Llama (built from a config,
no download; every decoder layer and the root sharded with ``fully_shard``), takes the trainer's
backward (FSDP2 reduce-scatters the averaged gradient into the sharded ``.grad``), forecasts with
``EntropyProbe.run(eval_batch=E, from_grad=True)`` how much the coming AdamW step will change the
policy's entropy, takes the real step, and measures the change on the same E with
``measure_change``. The ranks process every E unit together (forward and backward are FSDP2
collectives); every rank gets the same numbers; rank 0 prints them. See docs/distributed.md, FSDP.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import entropy_probe as ep
from entropy_probe.logprobs import sequence_logprobs
from entropy_probe.objectives import advantages

PAD, EOS = 0, 1


def tiny_llama(vocab: int) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def sample_rollouts(
    policy: LlamaForCausalLM,
    n_prompts: int,
    group_size: int,
    prompt_len: int,
    max_new: int,
    first_group_id: int,
    device: torch.device,
) -> ep.RolloutBatch:
    """G sampled responses per random prompt, by hand (FSDP2's forward is a collective, so every
    rank decodes the same number of tokens); reward = share of even token ids in the response."""
    vocab = policy.config.vocab_size
    ids = torch.randint(2, vocab, (n_prompts, prompt_len), device=device).repeat_interleave(
        group_size, 0
    )  # (N, P)
    for _ in range(max_new):
        logits = policy(input_ids=ids, use_cache=False).logits[:, -1]  # (N, V)
        ids = torch.cat([ids, torch.multinomial(logits.float().softmax(-1), 1)], dim=1)
    resp_ids = ids[:, prompt_len:]  # (N, R)
    after_eos = (resp_ids == EOS).long().cumsum(dim=1) - (
        resp_ids == EOS
    ).long() > 0  # (N, R) past the first EOS
    resp_mask = (~after_eos).long()
    prompts = ids[:, :prompt_len]
    ids = torch.cat([prompts, resp_ids * resp_mask], dim=1)  # (N, P + R)
    attn = torch.cat([torch.ones_like(prompts), resp_mask], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompts), resp_mask], dim=1)
    rewards = ((resp_ids % 2 == 0) & (resp_mask > 0)).sum(dim=1) / resp_mask.sum(dim=1)  # (N,)
    group_ids = first_group_id + torch.arange(n_prompts, device=device).repeat_interleave(group_size)
    return ep.RolloutBatch(ids, attn, response_mask, group_ids, rewards=rewards.float())


def grpo_loss(model, batch: ep.RolloutBatch) -> torch.Tensor:
    """GRPO at ratio 1, "seq-mean-token-mean": -mean_i A_i S_i / L_i over this rank's sequences
    (FSDP2 averages the gradient over ranks: the global mean when every rank holds as many)."""
    lp = sequence_logprobs(model, batch, temperature=1.0, weighting="token-mean")
    return -(advantages(batch, "grpo") * lp.weighted).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-rank", type=int, default=4, help="units of U and of E on each rank")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial policy on every rank, then sharded
    policy = tiny_llama(vocab=64).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for layer in policy.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    probe = ep.EntropyProbe(policy, optimizer, ep.ProbeConfig(direction="optimizer-step"))

    torch.manual_seed(1000 + rank)  # each rank samples its own rollouts
    n = args.prompts_per_rank
    for step in range(args.steps):
        base = (step * world + rank) * 2 * n  # group ids unique over ranks and steps
        U = sample_rollouts(
            policy, n, args.group_size, prompt_len=4, max_new=8, first_group_id=base, device=device
        )
        E = sample_rollouts(
            policy, n, args.group_size, prompt_len=4, max_new=8, first_group_id=base + n, device=device
        )

        optimizer.zero_grad(set_to_none=True)
        grpo_loss(policy, U).backward()  # the trainer's backward: .grad holds this rank's shard
        r = probe.run(eval_batch=E, from_grad=True)  # collective: every rank, its own E
        optimizer.step()  # the step the probe forecast
        m = probe.measure_change(r)
        if rank == 0:
            lo, hi = r.interval()
            print(
                f"step {step}: entropy {r.entropy:.4f} nats over {r.n_eval_units} E units on {world} ranks | "
                f"forecast dH1 {r.delta_h1:+.3e} (SE over E {r.se_cond_e:.1e}, 95% [{lo:+.2e}, {hi:+.2e}]) | "
                f"measured {m.delta_h:+.3e} +- {m.se:.1e} (ESS {m.ess:.1f})",
                flush=True,
            )

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
