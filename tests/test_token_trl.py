"""``result.entropy`` with ``entropy="token"`` against the ``entropy`` a real TRL ``GRPOTrainer`` logs, on the
very batch and parameters the trainer computed it from.

The trainer's ``compute_loss`` is wrapped to keep each training batch (prompt and completion ids and
masks) and the parameters at that moment; after training, the probe reads each kept batch at its kept
parameters. TRL logs ``sum(m H_t) / sum(m)`` over the batch's completion tokens (``completion_mask``, the
EOS counted) with H_t of ``softmax(logits / temperature)``: the probe must give the same number.

Run: ``PYTHONPATH=src pytest -q tests/test_token_trl.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from trl_support import grpo_trainer, tiny_qwen2, word_tokenizer

import entropy_probe as ep

TEMPERATURE = 0.7


def rollout_batch(inputs: dict) -> ep.RolloutBatch:
    """The trainer's batch as the probe's: prompt then completion, the completion mask as response mask,
    rows with the same prompt as one unit."""
    prompt, completion = inputs["prompt_ids"], inputs["completion_ids"]
    ids = torch.cat([prompt, completion], dim=1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    response = torch.cat([torch.zeros_like(inputs["prompt_mask"]), inputs["completion_mask"]], dim=1)
    groups = torch.unique(prompt, dim=0, return_inverse=True)[1]  # (N,) one id per distinct prompt
    return ep.RolloutBatch(ids, attention, response, groups)


@pytest.mark.filterwarnings("ignore")
def test_probe_entropy_is_trls_logged_entropy(tmp_path):
    kept = []
    trainer = grpo_trainer(tmp_path, steps=2, temperature=TEMPERATURE)
    compute_loss = trainer.compute_loss

    def keeping(model, inputs, *args, **kwargs):
        state = copy.deepcopy(trainer.accelerator.unwrap_model(model).state_dict())
        kept.append(({k: inputs[k].detach().clone() for k in inputs if k.endswith(("_ids", "_mask"))}, state))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = keeping
    trainer.train()
    logged = [h["entropy"] for h in trainer.state.log_history if "entropy" in h]
    assert len(kept) == len(logged) == 2  # one loss computation per optimizer step and log
    for (inputs, state), trl_entropy in zip(kept, logged):
        model = tiny_qwen2(word_tokenizer())
        model.load_state_dict(state)
        batch = rollout_batch(inputs)
        cfg = ep.ProbeConfig(lr=1e-2, direction="sgd", temperature=TEMPERATURE)
        assert cfg.entropy == "token"  # the default is the number the trainer logs
        v = {n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()}
        r = ep.EntropyProbe(model, config=cfg).run(eval_batch=batch, direction=v)
        assert abs(r.entropy - trl_entropy) <= 1e-6 * trl_entropy, (r.entropy, trl_entropy)
        # and the sequence functional is not that number: the gap the token level closes
        seq = ep.ProbeConfig(lr=1e-2, direction="sgd", entropy="sequence")
        r_seq = ep.EntropyProbe(model, config=seq).run(eval_batch=batch, direction=v)
        assert abs(r_seq.entropy - trl_entropy) > 1e-4
