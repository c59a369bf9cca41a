"""The entropy probe inside a DDP GRPO loop: every rank holds its share of the rollouts.

Run (CPU: gloo; GPUs: nccl, one process per GPU; the same command either way):

    torchrun --nproc_per_node=2 examples/ddp_probe.py            # installed package
    PYTHONPATH=src torchrun --nproc_per_node=2 examples/ddp_probe.py   # from a checkout

Each step, every rank samples its own prompts and responses from a tiny Llama (built from a config,
no download), forecasts with ``EntropyProbe`` how much the coming AdamW step will change the policy's
entropy, measures the truth (the same step applied functionally), then takes the real step through
DDP. Every rank gets the same numbers; rank 0 prints them. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
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
    """G sampled responses per random prompt; reward = share of even token ids in the response.

    Responses end at EOS (kept as a response token) or after ``max_new`` tokens; right padding.
    """
    vocab = policy.config.vocab_size
    prompts = torch.randint(2, vocab, (n_prompts, prompt_len), device=device)  # (B, P)
    prompts = prompts.repeat_interleave(group_size, dim=0)  # (N, P)
    out = policy.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=True,
        max_new_tokens=max_new,
        min_new_tokens=1,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    resp_ids = out[:, prompt_len:]  # (N, R)
    after_eos = (resp_ids == EOS).long().cumsum(dim=1) - (
        resp_ids == EOS
    ).long() > 0  # (N, R) past the first EOS
    resp_mask = (~after_eos).long()
    ids = torch.cat([prompts, resp_ids * resp_mask], dim=1)  # (N, P + R)
    attn = torch.cat([torch.ones_like(prompts), resp_mask], dim=1)
    response_mask = torch.cat([torch.zeros_like(prompts), resp_mask], dim=1)
    rewards = ((resp_ids % 2 == 0) & (resp_mask > 0)).sum(dim=1) / resp_mask.sum(dim=1)  # (N,)
    group_ids = first_group_id + torch.arange(n_prompts, device=device).repeat_interleave(group_size)
    return ep.RolloutBatch(ids, attn, response_mask, group_ids, rewards=rewards.float())


def grpo_loss(model: DDP, batch: ep.RolloutBatch) -> torch.Tensor:
    """GRPO at ratio 1, "seq-mean-token-mean": -mean_i A_i S_i / L_i over this rank's sequences.

    Every rank holds the same number of sequences, so DDP's gradient average is the global mean,
    the aggregation the probe's default ``loss_aggregation`` forecasts.
    """
    lp = sequence_logprobs(model, batch, temperature=1.0, weighting="token-mean")
    adv = advantages(batch, "grpo")
    return -(adv * lp.weighted).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-rank", type=int, default=4, help="units of U and of E on each rank")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    # The timeout bounds every collective of the probe too (a rank that never arrives raises).
    dist.init_process_group(backend, timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial policy on every rank (DDP also broadcasts rank 0's)
    policy = tiny_llama(vocab=64).to(device)
    model = DDP(policy, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    probe = ep.EntropyProbe(model, optimizer, ep.ProbeConfig(direction="optimizer-step", microbatch_units=4))

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

        # The forecast and the truth: collective calls, made by every rank with its own share.
        r = probe.run(U, E, truth=True)
        if rank == 0:
            lo, hi = r.interval()
            print(
                f"step {step}: entropy {r.entropy:.4f} nats over {r.n_eval_units} E units on {world} ranks | "
                f"forecast dH1 {r.delta_h1:+.3e} (SE over E {r.se_cond_e:.1e}, total {r.se_total:.1e}, "
                f"95% [{lo:+.2e}, {hi:+.2e}]) | truth {r.truth.delta_h:+.3e} +- {r.truth.se:.1e} "
                f"(ESS {r.truth.ess:.1f})",
                flush=True,
            )

        # The real step the probe forecast, through DDP (its own gradient all-reduce happens here).
        optimizer.zero_grad(set_to_none=True)
        grpo_loss(model, U).backward()
        optimizer.step()

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
