"""``dataproto_to_rollout_batch`` on verl's own ``DataProto``, laid out as verl's trainer holds rollouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from verl_support import rollout_dataproto

from entropy_probe.integrations.verl import dataproto_to_rollout_batch

PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]


def test_units_masks_rewards_and_advantages():
    data = rollout_dataproto(PROMPTS, group=4, resp_len=6, seed=3)
    b = dataproto_to_rollout_batch(data)
    tp = data.batch["prompts"].shape[1]
    assert b.n_units == 3 and b.unit_sizes.tolist() == [4, 4, 4]
    assert torch.equal(b.input_ids, data.batch["input_ids"])
    assert torch.equal(b.attention_mask, data.batch["attention_mask"])
    assert not b.response_mask[:, :tp].any() and torch.equal(
        b.response_mask[:, tp:], data.batch["response_mask"]
    )
    assert torch.equal(b.rewards, data.batch["token_level_rewards"].sum(dim=1))
    assert torch.equal(b.advantages, data.batch["advantages"][:, 0])  # one value per response (GRPO)
    # rows of one uid need not be adjacent: verl shuffles and balances batches
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    shuffled = dataproto_to_rollout_batch(data[perm.numpy()])
    assert shuffled.n_units == 3 and sorted(shuffled.unit_sizes.tolist()) == [4, 4, 4]


def test_bad_layouts_are_named():
    data = rollout_dataproto(PROMPTS, group=2, resp_len=5, seed=1)
    gae = data.batch["advantages"].clone()
    gae[3, 1] += 0.5  # a per-token advantage on row 3
    data.batch["advantages"] = gae
    with pytest.raises(ValueError, match="row 3 vary over its response tokens"):
        dataproto_to_rollout_batch(data)
    assert dataproto_to_rollout_batch(data, with_advantages=False).advantages is None
    data.non_tensor_batch = {"other": np.array(["a"] * len(data), dtype=object)}
    with pytest.raises(ValueError, match="no 'uid'"):
        dataproto_to_rollout_batch(data)
    data = rollout_dataproto(PROMPTS, group=2, resp_len=5, seed=1)
    data.batch["input_ids"][2, -1] = 40  # not prompts then responses
    with pytest.raises(ValueError, match="input_ids row 2"):
        dataproto_to_rollout_batch(data)
