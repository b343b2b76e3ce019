"""The main job: train(cfg) in-process, the Hydra CLI as a subprocess, and a 2-process run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scripts.train import train
from tests.test_config import compose_main

ROOT = Path(__file__).resolve().parent.parent
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def test_train_fast_dev_run_prints_metrics_and_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose_main("trainer.fast_dev_run=true", *QUIET, output_dir=str(tmp_path))
    metrics = train(cfg)
    out = capsys.readouterr().out
    assert {"val_acc", "val_loss", "train_loss"} <= set(metrics)
    assert f"val_acc: {metrics['val_acc']:.6g}" in out.splitlines()
    assert "what took part in backprop:" in out and "backbone" in out and "total" in out


@pytest.mark.slow
def test_default_job_reaches_target_accuracy(tmp_path: Path) -> None:
    # The README's promise: the default job reaches val_acc >= 0.9 in 3 epochs.
    cfg = compose_main(*QUIET, "callbacks=none", output_dir=str(tmp_path))
    assert cfg.trainer.max_epochs == 3
    metrics = train(cfg)
    assert metrics["val_acc"] >= 0.9
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").exists()


def run_cli(*overrides: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *overrides],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cli_good_override(tmp_path: Path) -> None:
    proc = run_cli(
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "logger=none",
        "callbacks=none",
        f"hydra.run.dir={tmp_path}",
        *QUIET,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(line.startswith("val_acc: ") for line in proc.stdout.splitlines())


@pytest.mark.timeout(120)
def test_cli_unknown_key_fails_cleanly(tmp_path: Path) -> None:
    proc = run_cli("trainer.max_epoch=3", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "Could not override 'trainer.max_epoch'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.timeout(120)
def test_cli_bad_value_fails_cleanly(tmp_path: Path) -> None:
    proc = run_cli("model.lr=-1", "logger=none", "callbacks=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "`lr` must be positive, got -1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_process_ddp_spawn_run(tmp_path: Path) -> None:
    # Each rank sees half the data per epoch, so 6 epochs take as many steps as 3 single-process ones.
    cfg = compose_main(
        "trainer=ddp", "trainer.max_epochs=6", "callbacks=none", "logger=none", *QUIET, output_dir=str(tmp_path)
    )
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy == "ddp_spawn"
    metrics = train(cfg)
    assert metrics["val_acc"] >= 0.9  # learns as the single-process job does (measured 0.98)
