"""LISA, BAdam and AdaptiveFreezing under FSDP2 (ModelParallelStrategy, 2 gloo processes): no hang, ranks
identical, equal to DDP bit for bit, and the blocks a schedule leaves out bit-identical to their start (AdamW with
weight decay 0.1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("_layer_sampling_fsdp.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 60)]
#: Blocks each schedule leaves alone in 10 steps (ShardNet has 3): LISA (seed 3) draws 0, 1, 0, 0, 1; BAdam visits all.
UNTRAINED = {"lisa": {"blocks.2"}, "badam": set(), "adaptive_freezing": set()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("layer_sampling_fsdp2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the FSDP2/DDP runs did not end within {TIMEOUT_S} s (a hang?):\n{err.stdout}{err.stderr}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return out


@pytest.mark.parametrize("name", ["lisa", "badam", "adaptive_freezing"])
def test_fsdp2_equals_ddp_bit_for_bit_and_leaves_unscheduled_blocks_alone(runs: Path, name: str) -> None:
    load = lambda strategy, rank: torch.load(runs / f"{name}-{strategy}-rank{rank}.pt", weights_only=False)  # noqa: E731
    fsdp0, fsdp1, ddp0 = load("fsdp2", 0), load("fsdp2", 1), load("ddp", 0)
    initial = fsdp0["initial"]
    for key, value in fsdp0["state"].items():
        assert torch.equal(value, fsdp1["state"][key]), f"{name}: FSDP2 ranks differ in {key}"
        assert torch.equal(value, ddp0["state"][key]), f"{name}: FSDP2 and DDP differ in {key}"
        block = ".".join(key.split(".")[:2])
        if key.startswith("blocks."):
            assert torch.equal(value, initial[key]) == (block in UNTRAINED[name]), f"{name}: {key}"
