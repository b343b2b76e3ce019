"""The main job under FSDP2 (``scripts/train.py trainer=fsdp``) on 2 CPU processes, against ``trainer=ddp``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_partial.demos import DigitsClassifier

ROOT = Path(__file__).resolve().parents[2]


def run_job(tmp_path: Path, trainer: str, *overrides: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # this checkout's lit_partial
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        f"trainer={trainer}",
        f"hydra.run.dir={tmp_path / trainer}",
    ]
    cmd += ["logger=none", "callbacks=none", "trainer.enable_progress_bar=false", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return float(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("val_acc: ")))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_main_job_reaches_the_accuracy_of_ddp(tmp_path: Path) -> None:
    # 2 processes: each sees half the data per epoch, so 6 epochs take as many steps as 3 single-process ones.
    # Not bit-identical to DDP: the CNN's BatchNorm statistics are not synced under FSDP2 (DDP broadcasts rank 0's
    # buffers before every forward), and validation reads them. The claim is parity with DDP (within 2 points);
    # the floor only catches a run that did not learn (both land near 0.90 on this 6-epoch job).
    overrides = ("partial=freeze_then_unfreeze", "trainer.max_epochs=6")
    fsdp, ddp = run_job(tmp_path, "fsdp", *overrides), run_job(tmp_path, "ddp", *overrides)
    assert fsdp >= 0.85 and abs(fsdp - ddp) <= 0.02, (fsdp, ddp)


def test_configure_model_does_nothing_without_a_device_mesh() -> None:
    model = DigitsClassifier()
    before = {n: p for n, p in model.named_parameters()}
    model.configure_model()  # single device and DDP: no mesh, nothing sharded
    assert all(before[n] is p for n, p in model.named_parameters())
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
