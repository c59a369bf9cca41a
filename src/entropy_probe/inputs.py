"""Checks on what callers hand the probe that need more than one field: numbers that are not booleans,
and token ids inside the model's vocabulary (DESIGN section 24: no silent wrong numbers).

A boolean is an ``int`` to Python, so ``lr=True`` would run at rate 1; a token id at or above the
embedding size raises an IndexError deep in the model (a device-side assert on CUDA) that names
neither the field nor the row. Both are refused here, by name.

>>> is_number(True), is_number(1), is_number(0.5), is_number("1.0")
(False, True, True, False)
"""

from __future__ import annotations

import numbers

import torch
from torch import nn


def is_number(x) -> bool:
    """A real number that is not a boolean (``True`` is an ``int`` to Python; numpy scalars count)."""
    return (
        isinstance(x, numbers.Real)
        and not isinstance(x, (bool, torch.Tensor))
        and type(x).__name__ != "bool_"
    )


def is_integer(x) -> bool:
    """An integer that is not a boolean."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool) and type(x).__name__ != "bool_"


def model_vocab_size(module: nn.Module) -> int | None:
    """The number of token ids the model embeds, or None when it cannot be told.

    Hugging Face models: the input embedding's ``num_embeddings`` (it can exceed ``config.vocab_size``
    after ``resize_token_embeddings``); other modules: an integer ``vocab_size`` attribute, or
    ``config.vocab_size``.
    """
    get = getattr(module, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return int(emb.num_embeddings)
    for owner in (module, getattr(module, "config", None)):
        size = getattr(owner, "vocab_size", None)
        if is_integer(size) and size > 0:
            return int(size)
    return None


def check_token_ids(vocab_size: int | None, **batches) -> None:
    """Every id of every batch given by name (padding positions included: the model embeds them too) is
    below ``vocab_size``; None batches and an unknown vocabulary are skipped."""
    if vocab_size is None:
        return
    for name, batch in batches.items():
        if batch is None:
            continue
        ids = batch.input_ids
        bad = ids >= vocab_size  # (N, T)
        if bad.any():
            row = int(bad.any(dim=1).nonzero()[0, 0])
            col = int(bad[row].nonzero()[0, 0])
            raise ValueError(
                f"{name}.input_ids: row {row} holds token id {int(ids[row, col])} at position {col}, outside "
                f"the model's vocabulary (embedding size {vocab_size}; padding positions count too)"
            )
