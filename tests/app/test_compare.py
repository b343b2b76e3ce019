"""The multirun comparison: one command runs several presets and writes comparison.md and comparison.png."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lit_partial.app.compare import load_runs, markdown_table, write_report
from tests.helpers.cli import ROOT, TRAIN, job_env

PRESETS = ("none", "freeze_backbone", "gradual_unfreeze")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_multirun_writes_a_report_listing_every_preset(tmp_path: Path, pretrain_cache: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "-m",
            f"partial={','.join(PRESETS)}",
            "trainer.max_epochs=4",
            f"pretrain.cache_dir={pretrain_cache}",
            "pretrain.max_epochs=1",
            "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false",
            "logger=none",
            "callbacks=none",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=880,
        cwd=ROOT,
        env=job_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (sweep / "comparison.md").read_text()
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == list(PRESETS)
    assert (sweep / "comparison.png").stat().st_size > 10_000
    assert "comparison report:" in proc.stdout
    runs = {r["name"]: r for r in load_runs(sweep)}
    assert runs["freeze_backbone"]["backward_flops"] < 0.01 * runs["none"]["backward_flops"]
    assert (
        runs["none"]["backward_flops"]
        > runs["gradual_unfreeze"]["backward_flops"]
        > runs["freeze_backbone"]["backward_flops"]
    )


def test_report_from_costs_files(tmp_path: Path) -> None:
    for i, (name, flops) in enumerate([("none", 4e6), ("freeze_backbone", 1e6)]):
        (tmp_path / str(i)).mkdir()
        record = {
            "name": name,
            "val_acc": 0.9,
            "backward_flops": flops,
            "forward_flops": 1e6,
            "trainable_params": 10,
            "saved_activation_bytes": 2048,
            "optimizer_state_bytes": 4096,
            "step_time_ms": 2.0 * (i + 1),
        }
        (tmp_path / str(i) / "costs.json").write_text(json.dumps(record))
    md, png = write_report(tmp_path)  # type: ignore[misc]
    assert "| freeze_backbone | 0.900 | 1.00 | 0.25x |" in md.read_text() and png.is_file()
    assert markdown_table(load_runs(tmp_path)).count("\n") == 3
    assert write_report(tmp_path / "empty") is None


def test_the_saved_column_is_the_larger_count_so_selective_checkpointing_caches_show() -> None:
    from lit_partial.app.compare import saved_bytes

    costs = {"val_acc": 0.9, "backward_flops": 1e6, "forward_flops": 1e6, "trainable_params": 10}
    costs |= {"optimizer_state_bytes": 4096, "step_time_ms": 2.0}
    rows = [
        {"name": "none", **costs, "saved_activation_bytes": 8192},  # recorded before live_forward_bytes existed
        {"name": "sac", **costs, "saved_activation_bytes": 1024, "live_forward_bytes": 6144},  # hooks miss the cache
        {"name": "batch", **costs, "saved_activation_bytes": 3072, "live_forward_bytes": 2048},  # the batch is saved
    ]
    assert [saved_bytes(r) for r in rows] == [8192, 6144, 3072]
    assert [line.split(" | ")[5] for line in markdown_table(rows).splitlines()[2:]] == ["8", "6", "3"]
