"""``ProbeCall``: what every step of one probe call reads, in one object instead of threaded arguments."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ProbeConfig
from .distributed import Communicator
from .passes import Passes
from .vectors import Params


@dataclass(frozen=True)
class ProbeCall:
    """The model, its trainable parameters, the options and where the passes run, for one call.

    module: the unwrapped model (DDP's ``.module``); params: its trainable parameters by name.
    lr: eta, the rate of the step forecast. v_lr: the rate v is normalised by (the optimizer's own, so
    that ``ProbeConfig.lr`` scales the whole step; ``direction.build_direction``'s ``lr``).
    """

    module: nn.Module
    params: Params
    config: ProbeConfig
    comm: Communicator
    passes: Passes
    optimizer: torch.optim.Optimizer | None
    lr: float
    v_lr: float
