"""The main job: train(cfg) in-process, the transfer-learning result, the CLI's output and log, a 2-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_partial.app.pretrain import cache_path
from lit_partial.app.train import train
from tests.helpers.cli import compose_train, run_job, run_job_forked

QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def test_train_fast_dev_run_prints_metrics_summary_and_output_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = compose_train("trainer.fast_dev_run=true", "pretrain.enabled=false", *QUIET, output_dir=str(tmp_path))
    metrics = train(cfg)
    out = capsys.readouterr().out
    assert {"val_acc", "val_loss", "train_loss"} <= set(metrics)
    assert f"val_acc: {metrics['val_acc']:.6g}" in out.splitlines()
    assert "what took part in backprop" in out and "backbone" in out and "total" in out
    assert f"output folder: {tmp_path}" in out.splitlines()


@pytest.mark.timeout(120)
def test_logger_none_leaves_the_learning_rate_monitor_out_with_one_line_and_trains(tmp_path: Path) -> None:
    # The default callbacks hold a LearningRateMonitor, which Lightning refuses to run without a logger.
    tiny = ("trainer.max_steps=2", "trainer.limit_val_batches=0", "pretrain.enabled=false", "costs.enabled=false")
    proc = run_job_forked("logger=none", *tiny, *QUIET, run_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stdout.splitlines() if "leaving out" in line]
    assert notes == [
        "no logger configured: leaving out callbacks.learning_rate_monitor (a LearningRateMonitor needs a logger to "
        "log to)"
    ]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # the other default callbacks still ran (last.ckpt)
    assert not any("LearningRateMonitor" in key for key in ckpt["callbacks"])
    assert any("ModelCheckpoint" in key for key in ckpt["callbacks"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_frozen_backbone_fine_tuning_is_far_above_chance_at_a_fraction_of_the_backward_cost(tmp_path: Path) -> None:
    # The main job as `make train` runs it (6 pretraining epochs on digits 0-4), with the backbone frozen throughout.
    # Measured: val_acc 0.85 on digits 5-9 (chance 0.2), backward FLOPs 0.0006 of full fine-tuning, which reaches 1.0.
    cache = tmp_path / "cache"
    common = ["logger=none", "callbacks=none", f"pretrain.cache_dir={cache}", *QUIET]
    frozen = train(compose_train("partial=freeze_backbone", *common, output_dir=str(tmp_path / "frozen")))
    assert frozen["val_acc"] >= 0.6
    full = train(compose_train("partial=none", *common, output_dir=str(tmp_path / "full")))
    assert full["val_acc"] >= 0.9
    import json

    frozen_costs = json.loads((tmp_path / "frozen" / "costs.json").read_text())
    full_costs = json.loads((tmp_path / "full" / "costs.json").read_text())
    assert frozen_costs["backward_flops"] < 0.01 * full_costs["backward_flops"]
    assert frozen_costs["trainable_params"] < 0.01 * full_costs["trainable_params"]
    assert frozen_costs["optimizer_state_bytes"] < 0.02 * full_costs["optimizer_state_bytes"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pretraining_is_cached_and_forced_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    overrides = ["trainer.fast_dev_run=true", f"pretrain.cache_dir={cache}", "pretrain.max_epochs=1", *QUIET]
    cfg = compose_train(*overrides, output_dir=str(tmp_path / "a"))
    train(cfg)
    path = cache_path(cfg)
    assert "pretraining on digits [0, 1, 2, 3, 4]" in capsys.readouterr().out and path.is_file()
    saved = torch.load(path, weights_only=True)
    assert all(k.startswith("backbone.") for k in saved["state_dict"]) and saved["meta"]["classes"] == [0, 1, 2, 3, 4]
    stamp = path.stat().st_mtime_ns
    train(compose_train(*overrides, "partial=freeze_backbone", output_dir=str(tmp_path / "b")))
    assert "pretrained backbone: reusing" in capsys.readouterr().out and path.stat().st_mtime_ns == stamp
    train(compose_train(*overrides, "pretrain.force=true", output_dir=str(tmp_path / "c")))
    assert "pretraining on digits" in capsys.readouterr().out and path.stat().st_mtime_ns != stamp
    other = compose_train(*overrides, "model.dropout=0.2", output_dir=str(tmp_path / "d"))
    assert cache_path(other) != path  # settings that change the weights change the cache key
    assert cache_path(compose_train(*overrides, "data.batch_size=16")) == path  # fine-tuning settings do not


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_run_logs_to_train_log_and_prints_no_lightning_noise(tmp_path: Path) -> None:
    proc = run_job(
        "trainer.max_epochs=1", "pretrain.enabled=false", "partial=freeze_backbone", *QUIET, run_dir=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "train.log").read_text()
    for text in ("final metrics:", "val_acc: ", "LayerFreezing", f"output folder: {tmp_path}"):
        assert text in log and text in proc.stdout
    for noise in ("Tip:", "GPU available", "TPU available", "does not have many workers", "litlogger"):
        assert noise not in proc.stdout + proc.stderr + log
    assert proc.stdout.rstrip().splitlines()[-1] == f"output folder: {tmp_path}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_process_ddp_spawn_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Each rank sees half the data per epoch, so 10 epochs take as many steps as 5 single-process ones.
    cfg = compose_train(
        "trainer=ddp",
        "trainer.max_epochs=10",
        "callbacks=none",
        "logger=none",
        "pretrain.enabled=false",
        "partial=memory_monitor",
        *QUIET,
        output_dir=str(tmp_path),
    )
    assert cfg.trainer.devices == 2 and cfg.trainer.strategy == "ddp_spawn"
    metrics = train(cfg)
    assert metrics["val_acc"] >= 0.9  # learns as the single-process job does
    # the techniques trained in the worker processes; their summaries still reach the report
    assert "ActivationMemoryMonitor over the run:" in capsys.readouterr().out
