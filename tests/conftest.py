"""Shared fixtures. Tests run two at a time (pytest -n 2) on 2 cores: one torch thread each."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
