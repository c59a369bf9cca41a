"""RolloutBatch's unit structure and sub-batches against a hand grouping.

Run: ``PYTHONPATH=src pytest -q tests/test_core_batch.py``.
"""

from __future__ import annotations

import pytest
import torch
from core_support import random_batch, units_of

from entropy_probe import RolloutBatch


def interleaved() -> RolloutBatch:
    """Units whose rows are interleaved and whose group ids are neither sorted nor 0..B-1."""
    b = random_batch(4, group_size=[2, 3, 4, 2], seed=0)
    perm = torch.tensor([4, 0, 9, 2, 1, 10, 6, 3, 5, 8, 7])  # (N,) shuffled rows
    return RolloutBatch(
        b.input_ids[perm],
        b.attention_mask[perm],
        b.response_mask[perm],
        b.group_ids[perm],
        rewards=b.rewards[perm],
    )


def test_units_in_order_of_first_appearance():
    b = interleaved()
    groups = units_of(b)  # by hand
    first_ids = [int(b.group_ids[rows[0]]) for rows in groups]
    assert b.n_units == 4 and b.n_sequences == 11
    assert b.unit_ids.tolist() == first_ids
    assert b.unit_sizes.tolist() == [len(rows) for rows in groups]
    for u, rows in enumerate(groups):
        assert (b.unit_index[rows] == u).all()
        assert b.rows_of_units([u]).tolist() == rows  # rows of a unit keep batch order
    assert b.rows_of_units([2, 0]).tolist() == groups[2] + groups[0]
    assert b.response_lengths.tolist() == b.response_mask.sum(1).tolist()


def test_select_units_round_trip():
    b = interleaved()
    groups = units_of(b)
    sub = b.select_units([3, 1])
    rows = groups[3] + groups[1]
    assert torch.equal(sub.input_ids, b.input_ids[rows]) and torch.equal(sub.rewards, b.rewards[rows])
    assert sub.unit_ids.tolist() == [int(b.unit_ids[3]), int(b.unit_ids[1])]
    assert sub.advantages is None


@pytest.mark.parametrize("k", [1, 2, 3, 4, 10])
def test_microbatches_cover_every_unit_once(k):
    b = interleaved()
    seen = []
    for units, rows, mb in b.microbatches(k):
        assert 1 <= len(units) <= k and mb.n_units == len(units)
        assert torch.equal(rows, b.rows_of_units(units))
        assert torch.equal(mb.input_ids, b.input_ids[rows])
        seen += units
    assert seen == list(range(b.n_units))


def test_microbatches_reject_zero():
    with pytest.raises(ValueError, match="microbatch_units must be >= 1"):
        next(interleaved().microbatches(0))


def test_to_device_keeps_everything():
    b = interleaved()
    c = b.to("cpu")
    for name in ("input_ids", "attention_mask", "response_mask", "group_ids", "rewards", "unit_index"):
        assert torch.equal(getattr(b, name), getattr(c, name))


def test_eval_batch_needs_no_rewards():
    """Only the update batch's policy gradient uses rewards; an evaluation batch may carry none."""
    from core_support import TinyLM

    import entropy_probe as ep

    model = TinyLM(seed=0)
    U, E = random_batch(3, seed=1), random_batch(3, seed=2)
    bare = RolloutBatch(E.input_ids, E.attention_mask, E.response_mask, E.group_ids)
    probe = ep.EntropyProbe(model, config=ep.ProbeConfig(lr=1e-2, direction="sgd"))
    with_rewards, without = probe.run(U, E), probe.run(U, bare)
    assert without.delta_h1 == with_rewards.delta_h1 and without.se_cond_e == with_rewards.se_cond_e
