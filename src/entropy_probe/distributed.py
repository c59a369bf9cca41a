"""Communication of the probe: a single-process communicator; the DDP one builds on it.

The probe calls only these methods, so that one process and N ranks run the same code:
``sum_`` (in-place all-reduce of a list of tensors), ``gather`` (concatenate a 1-D tensor over
ranks in rank order) and ``check_same`` (every rank holds the same value, else a ValueError).
"""

from __future__ import annotations

from torch import Tensor, nn


class SingleProcess:
    """The communicator of a single process: every collective is the identity."""

    rank = 0
    world_size = 1

    def sum_(self, tensors: list[Tensor]) -> None:
        pass

    def gather(self, t: Tensor) -> Tensor:
        return t

    def check_same(self, what: str, value) -> None:
        pass


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or any ``.module`` wrapper such as DataParallel)."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or isinstance(model, nn.DataParallel):
        model = model.module
    return model


def communicator_for(model: nn.Module):
    return SingleProcess()
