from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import run_job


@pytest.fixture(scope="session")
def pretrain_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrained-backbone cache (1 pretraining epoch) shared by every CLI test of the session."""
    cache = tmp_path_factory.mktemp("pretrained")
    proc = run_job(
        f"pretrain.cache_dir={cache}",
        "pretrain.max_epochs=1",
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        "callbacks=none",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        run_dir=tmp_path_factory.mktemp("pretrain_run"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cache.glob("*.pt"))
    return cache
