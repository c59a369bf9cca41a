"""An exactly enumerable GPT-2 (imported by the large-step tests, DESIGN section 21).

A real ``GPT2LMHeadModel`` with the tabular policy's vocabulary {EOS, a, b} and its prompts: responses
end at EOS or after 3 tokens, so ``entropy_probe.toy``'s enumeration (15 responses per prompt) gives the
exact entropy and exact samples. Dropout is off so that the enumerated entropy is a function of the
weights.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import entropy_probe as ep
from entropy_probe.toy import DEFAULT_PROMPTS, exact_entropy, sample_enumerated


class EnumerableGPT2(nn.Module):
    """``GPT2LMHeadModel`` (2 layers, width 16, vocab 3) with the attributes ``toy``'s enumeration reads."""

    def __init__(self, seed: int = 0, init: float = 0.3):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.vocab_size, self.max_len, self.prompts = 3, 3, DEFAULT_PROMPTS
        config = GPT2Config(
            vocab_size=3,
            n_positions=8,
            n_embd=16,
            n_layer=2,
            n_head=2,
            initializer_range=init,  # 0.3: a peaked policy (0.02, GPT-2's own, is nearly uniform)
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.gpt = GPT2LMHeadModel(config)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None
    ) -> Tensor:
        out = self.gpt(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.logits


def first_adamw_step(lr: float, seed: int = 0, update_units: int = 16):
    """A fresh AdamW about to take its first step from the trainer's ``.grad`` (GRPO surrogate on a
    sampled U), and the exact entropy change that step causes (enumeration, on a copy that really steps).

    Returns ``(model, optimizer, exact change)``; the model and optimizer are left before the step."""
    model = EnumerableGPT2(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    update = sample_enumerated(model, update_units, 4, seed=seed + 1)
    ep.policy_loss(model, update, ep.ProbeConfig()).backward()
    stepped = copy.deepcopy(model)
    for p, q in zip(model.parameters(), stepped.parameters()):
        q.grad = p.grad.clone()  # deepcopy leaves .grad behind
    copy_opt = torch.optim.AdamW(stepped.parameters(), lr=lr)
    copy_opt.step()
    with torch.no_grad():
        exact = float(exact_entropy(stepped)) - float(exact_entropy(model))
    return model, opt, exact
