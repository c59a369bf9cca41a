"""The microbatches the passes iterate are ``select_units`` of their units, built without checking again.

``RolloutBatch.microbatches`` builds each sub-batch from the parent's validated structure (no re-validation,
no host sync: the per-unit passes build B_E of them per call); every field and every derived structure must
equal what the validating constructor (``select_units``) derives. Run:
``PYTHONPATH=src pytest -q tests/test_batch_microbatches.py``.
"""

from __future__ import annotations

import pytest
import torch
from core_support import random_batch

from entropy_probe.batch import RolloutBatch

FIELDS = ("input_ids", "attention_mask", "response_mask", "group_ids", "rewards", "advantages")
DERIVED = ("unit_ids", "unit_index", "unit_sizes", "_row_order")


def interleaved() -> RolloutBatch:
    """Units whose rows are not adjacent, one row with an empty response (dropped by the parent)."""
    base = random_batch(4, group_size=[2, 3, 4, 2], seed=5)
    perm = torch.randperm(base.n_sequences, generator=torch.Generator().manual_seed(0))
    resp, groups = base.response_mask[perm].clone(), base.group_ids[perm]
    row = next(i for i in range(len(groups)) if int((groups == groups[i]).sum()) >= 3)
    resp[row] = 0  # no response token: the parent drops this row (its unit keeps >= 2 rows)
    batch = RolloutBatch(
        base.input_ids[perm], base.attention_mask[perm], resp, groups, rewards=base.rewards[perm]
    )
    assert batch.n_dropped_rows == 1
    return batch


@pytest.mark.parametrize("units_per_batch", [1, 2, 3, 10])
@pytest.mark.parametrize("make", [lambda: random_batch(5, group_size=[2, 3, 4, 3, 2], seed=1), interleaved])
def test_microbatches_equal_select_units(units_per_batch, make):
    batch = make()
    seen = []
    for mb in batch.microbatches(units_per_batch):
        ref = batch.select_units(mb.units)
        for name in FIELDS + DERIVED:
            a, b = getattr(mb.batch, name), getattr(ref, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        assert mb.batch._unit_spans == ref._unit_spans and mb.batch.n_dropped_rows == ref.n_dropped_rows == 0
        assert torch.equal(mb.rows, batch.rows_of_units(mb.units))
        seen += mb.units
    assert seen == list(range(batch.n_units))
