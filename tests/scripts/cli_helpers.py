"""Run the main job's CLI in a subprocess (with a timeout) and share a pretrained-backbone cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "scripts" / "train.py"


def run_job(
    *overrides: str, run_dir: Path, timeout: int = 400, new_session: bool = False, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python scripts/train.py <overrides> hydra.run.dir=<run_dir>`` from the repository root."""
    base = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "LIT_PARTIAL_USER_HYDRA_FULL_ERROR")}
    full_env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, str(TRAIN), *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=full_env,
        start_new_session=new_session,
    )
