"""The sharded-tensor helpers on 2 CPU processes (gloo), without Lightning: see ``_dtensor_checks.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_dtensor_checks.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sharded_masks_statistics_and_decisions_on_two_processes() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # A timeout turns a collective mismatch that hangs (instead of aborting) into a failure.
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    passed = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert passed == [
        "check_shard_like_follows_the_parameter_layout",
        "check_masking_kernels_on_shards_match_the_unsharded_run_bit_for_bit",
        "check_global_statistics_equal_those_of_the_concatenated_tensors",
        "check_decisions_are_taken_once_for_all_ranks",
    ]
