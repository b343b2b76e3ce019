from __future__ import annotations

import os
import warnings

import pytest
import torch

# Two cores: one intra-op thread per process keeps multi-process tests from oversubscribing the machine.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*litlogger.*")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
