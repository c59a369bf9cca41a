"""The rollout batch: N sequences grouped into units (one prompt with its G >= 2 responses).

A response token at position t has log-prob ``log pi(input_ids[t] | input_ids[<t])``, read from the
logits at position t-1 (DESIGN section 2). Everything the probe later assumes is checked here, once,
so that every later error can name the field and the row or unit at fault.

>>> import torch
>>> ids = torch.tensor([[5, 1, 2], [5, 2, 0], [6, 1, 0], [6, 2, 2]])
>>> resp = torch.tensor([[0, 1, 1], [0, 1, 1], [0, 1, 0], [0, 1, 1]])
>>> b = RolloutBatch(ids, torch.ones_like(ids), resp, torch.tensor([7, 7, 3, 3]),
...                  rewards=torch.tensor([1.0, 0.0, 0.5, 0.5]))
>>> b.n_units, b.unit_ids.tolist(), b.response_lengths.tolist()
(2, [7, 3], [2, 2, 1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from .inputs import is_number

INDEX_DTYPES = (torch.int32, torch.int64)


def _first_bad_row(bad: Tensor) -> int:
    """Index of the first row (dim 0) where ``bad`` holds anywhere."""
    rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()
    return int(rows[0, 0])


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are the same device when 0 is the current one."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device()
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


@dataclass
class RolloutBatch:
    """N sampled sequences, validated on construction.

    Fields (N sequences, T positions):
        input_ids: ``(N, T)`` integer token ids, prompt then response, padded either side.
        attention_mask: ``(N, T)`` 1 for real tokens, 0 for padding.
        response_mask: ``(N, T)`` 1 where the token is a response token; a subset of attention_mask,
            never at position 0 (its log-prob needs the logits of the position before).
        group_ids: ``(N,)`` integer id of the prompt each sequence answers; a unit is one group id.
        rewards: ``(N,)`` scalar reward per sequence (advantages are then derived from them).
        advantages: ``(N,)`` advantages as computed by the caller (``advantage_estimator="given"``).
        An update batch needs one of the two; an evaluation batch needs neither.

    Rows with no response token (e.g. truncations masked by the trainer) are dropped on construction
    and counted in ``n_dropped_rows``; a unit left with fewer than 2 responses is an error.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    group_ids: Tensor
    rewards: Tensor | None = None
    advantages: Tensor | None = None
    # Derived on construction: unit structure.
    unit_ids: Tensor = field(init=False, repr=False)
    unit_index: Tensor = field(init=False, repr=False)
    unit_sizes: Tensor = field(init=False, repr=False)
    _row_order: Tensor = field(init=False, repr=False, compare=False)  # rows sorted by unit (stable)
    _unit_spans: list = field(init=False, repr=False, compare=False)  # (start, size) of each unit there
    n_dropped_rows: int = field(init=False, default=0)  # rows with no response token, dropped on construction

    def __post_init__(self) -> None:
        self._scalars_as_tensors()
        self._validate_shapes()
        dropped_groups = self._drop_empty_responses()
        self._validate_masks()
        self._validate_scalars()
        # Units in order of first appearance; unit_index[i] is sequence i's unit (0..B-1).
        # Every derived tensor lives on group_ids' device (a CPU index into a CUDA tensor raises).
        dev = self.group_ids.device
        uniq, inverse = torch.unique(self.group_ids, return_inverse=True)
        first = torch.full((len(uniq),), self.n_sequences, dtype=torch.long, device=dev)
        first.scatter_reduce_(0, inverse, torch.arange(self.n_sequences, device=dev), reduce="amin")
        order = torch.argsort(first)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=dev)
        self.unit_ids = uniq[order]
        self.unit_index = rank[inverse]
        self.unit_sizes = torch.bincount(self.unit_index, minlength=len(uniq))
        # Sorted once here: the per-unit loops ask for one unit's rows B times.
        self._row_order = torch.argsort(self.unit_index, stable=True)
        starts = torch.cumsum(self.unit_sizes, 0) - self.unit_sizes
        self._unit_spans = list(zip(starts.tolist(), self.unit_sizes.tolist()))
        small = (self.unit_sizes < 2).nonzero()
        if len(small):
            u = int(small[0, 0])
            n_gone = int((dropped_groups == self.unit_ids[u]).sum())
            gone = f" ({n_gone} row(s) with an empty response (no response token) dropped)" if n_gone else ""
            raise ValueError(
                f"RolloutBatch.group_ids: unit {int(self.unit_ids[u])} has "
                f"{int(self.unit_sizes[u])} response(s){gone}; every unit needs at least 2 (the "
                "leave-one-out baseline and group advantages need a second response)"
            )

    def _drop_empty_responses(self) -> Tensor:
        """Drop the rows whose response_mask holds no 1 (an evaluation row the trainer masked, e.g. a
        truncation); returns their group ids (empty when none) for the unit-size error."""
        empty = ~(self.response_mask != 0).any(dim=1)  # (N,)
        if not empty.any():
            return self.group_ids[:0]
        if empty.all():
            raise ValueError(
                "RolloutBatch.response_mask: every row has an empty response (no response token)"
            )
        keep = (~empty).nonzero().reshape(-1)  # (N_kept,)
        dropped = self.group_ids[empty]
        for name in ("input_ids", "attention_mask", "response_mask", "group_ids", "rewards", "advantages"):
            x = getattr(self, name)
            if x is not None:
                setattr(self, name, x[keep.to(x.device)])
        self.n_dropped_rows = int(empty.sum())
        return dropped

    # ---- validation -------------------------------------------------------------------------
    def _validate_shapes(self) -> None:
        for name in ("input_ids", "attention_mask", "response_mask", "group_ids"):
            if not isinstance(getattr(self, name), Tensor):
                raise ValueError(
                    f"RolloutBatch.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}"
                )
        if self.input_ids.dim() != 2:
            raise ValueError(
                f"RolloutBatch.input_ids must be (N, T), got shape {tuple(self.input_ids.shape)}"
            )
        if not _is_integer_dtype(self.input_ids.dtype):
            raise ValueError(
                f"RolloutBatch.input_ids must hold integer token ids, got {self.input_ids.dtype}"
            )
        if self.input_ids.dtype not in INDEX_DTYPES:  # uint8, int8, int16: embeddings index with int32/64
            self.input_ids = self.input_ids.long()
        n, t = self.input_ids.shape
        if n == 0 or t < 2:
            raise ValueError(
                f"RolloutBatch.input_ids has shape {(n, t)}; need N >= 1 sequences and T >= 2 positions"
            )
        for name in ("attention_mask", "response_mask"):
            if tuple(getattr(self, name).shape) != (n, t):
                raise ValueError(
                    f"RolloutBatch.{name} has shape {tuple(getattr(self, name).shape)}, "
                    f"expected {(n, t)} like input_ids"
                )
        for name in ("group_ids", "rewards", "advantages"):
            x = getattr(self, name)
            if x is not None and tuple(x.shape) != (n,):
                raise ValueError(
                    f"RolloutBatch.{name} has shape {tuple(x.shape)}, expected ({n},): one per sequence"
                )
        if not _is_integer_dtype(self.group_ids.dtype):
            raise ValueError(
                f"RolloutBatch.group_ids must be integers (not bool), got {self.group_ids.dtype}"
            )
        if (self.input_ids < 0).any():
            raise ValueError(
                f"RolloutBatch.input_ids: row {_first_bad_row(self.input_ids < 0)} has a negative token id"
            )

    def _scalars_as_tensors(self) -> None:
        """rewards/advantages given as a list, tuple or numpy array become a tensor (on group_ids' device);
        booleans are refused: a reward of True is a mistake more often than a 1."""
        for name in ("rewards", "advantages"):
            x = getattr(self, name)
            if x is None or isinstance(x, Tensor):
                continue
            values = x.tolist() if hasattr(x, "tolist") else x
            if not isinstance(values, (list, tuple)) or not all(is_number(v) for v in values):
                raise ValueError(
                    f"RolloutBatch.{name} must be a floating-point tensor or a list of numbers (not "
                    f"booleans), got {type(x).__name__}"
                )
            device = self.group_ids.device if isinstance(self.group_ids, Tensor) else None
            setattr(self, name, torch.tensor(values, dtype=torch.get_default_dtype(), device=device))

    def _validate_masks(self) -> None:
        for name in ("attention_mask", "response_mask"):
            m = getattr(self, name)
            bad = (m != 0) & (m != 1)
            if bad.any():
                raise ValueError(
                    f"RolloutBatch.{name}: row {_first_bad_row(bad)} holds values other than 0 and 1"
                )
        attn, resp = self.attention_mask.bool(), self.response_mask.bool()
        outside = resp & ~attn
        if outside.any():
            raise ValueError(
                f"RolloutBatch.response_mask: row {_first_bad_row(outside)} marks a padding position "
                "(attention_mask 0) as a response token"
            )
        if resp[:, 0].any():
            raise ValueError(
                f"RolloutBatch.response_mask: row {_first_bad_row(resp[:, :1])} marks position 0 as a "
                "response token; its log-prob needs a token before it"
            )
        # The token before each response token must be real, else its logits see only padding.
        prev_pad = resp[:, 1:] & ~attn[:, :-1]
        if prev_pad.any():
            raise ValueError(
                f"RolloutBatch.response_mask: row {_first_bad_row(prev_pad)} has a response token "
                "right after padding; responses must follow a real prompt token"
            )

    def _validate_scalars(self) -> None:
        for name in ("rewards", "advantages"):
            x = getattr(self, name)
            if x is None:
                continue
            if not isinstance(x, Tensor) or not x.dtype.is_floating_point:
                raise ValueError(f"RolloutBatch.{name} must be a floating-point tensor")
            bad = ~torch.isfinite(x)
            if bad.any():
                raise ValueError(
                    f"RolloutBatch.{name}: row {_first_bad_row(bad)} is {float(x[bad][0])} (not finite)"
                )

    # ---- structure ----------------------------------------------------------------------------
    @property
    def n_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_units(self) -> int:
        return int(self.unit_ids.shape[0])

    @property
    def response_lengths(self) -> Tensor:
        """``(N,)`` number of response tokens L_i per sequence."""
        return self.response_mask.sum(dim=1)

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    def rows_of_units(self, units: Tensor | list[int]) -> Tensor:
        """Row indices of the given units (positions 0..B-1), grouped unit by unit."""
        spans = [self._unit_spans[u] for u in torch.as_tensor(units, dtype=torch.long).tolist()]
        return torch.cat([self._row_order[start : start + size] for start, size in spans])

    def select_units(self, units: Tensor | list[int]) -> "RolloutBatch":
        """The sub-batch of the given units (positions 0..B-1), in the given order."""
        rows = self.rows_of_units(units)
        pick = lambda x: None if x is None else x[rows.to(x.device)]  # noqa: E731
        return RolloutBatch(
            pick(self.input_ids),
            pick(self.attention_mask),
            pick(self.response_mask),
            pick(self.group_ids),
            rewards=pick(self.rewards),
            advantages=pick(self.advantages),
        )

    def microbatches(self, units_per_batch: int) -> Iterator[Microbatch]:
        """The one microbatch loop of every pass: chunks of at most ``units_per_batch`` whole units."""
        if units_per_batch < 1:
            raise ValueError(f"microbatch_units must be >= 1, got {units_per_batch}")
        for start in range(0, self.n_units, units_per_batch):
            units = list(range(start, min(start + units_per_batch, self.n_units)))
            yield Microbatch(units, self.rows_of_units(units).to(self.device), self.select_units(units))

    def to(self, device: torch.device | str) -> "RolloutBatch":
        """The batch on ``device`` (this batch itself when every tensor is there already)."""
        device = torch.device(device)
        tensors = (
            self.input_ids,
            self.attention_mask,
            self.response_mask,
            self.group_ids,
            self.rewards,
            self.advantages,
        )
        if all(x is None or _same_device(x.device, device) for x in tensors):
            return self
        mv = lambda x: None if x is None else x.to(device)  # noqa: E731
        out = RolloutBatch(
            mv(self.input_ids),
            mv(self.attention_mask),
            mv(self.response_mask),
            mv(self.group_ids),
            rewards=mv(self.rewards),
            advantages=mv(self.advantages),
        )
        out.n_dropped_rows = self.n_dropped_rows
        return out


def check_batch(batch, name: str) -> None:
    """``batch`` is a RolloutBatch fit for its role (``name``: "update_batch" or "eval_batch")."""
    if not isinstance(batch, RolloutBatch):
        raise ValueError(f"run: {name} must be an entropy_probe.RolloutBatch, got {type(batch).__name__}")
    if name == "update_batch" and batch.n_dropped_rows:
        # The trainer's loss normalisers count such rows (they add 0 to the sums): dropping them would not.
        raise ValueError(
            f"update_batch: {batch.n_dropped_rows} row(s) have no response token; an update batch "
            "must keep every row its loss counts (use from_grad=True to forecast the trainer's step)"
        )


def on_device(batch: RolloutBatch | None, device: torch.device) -> RolloutBatch | None:
    """The batch on ``device`` (the model's): every tensor the probe makes lives there."""
    return None if batch is None else batch.to(device)


class Microbatch(NamedTuple):
    """Whole units of a batch, as one forward sees them.

    units: positions 0..B-1 of the units in the full batch; rows: ``(n,)`` their rows in the full
    batch (on its device), grouped unit by unit, the row order of ``batch``.
    """

    units: list[int]
    rows: Tensor
    batch: RolloutBatch
