"""A plateau-driven unfreeze on 2 CPU processes (ddp_spawn), for tests/callbacks/test_metric_schedules.py.

Run as a module from the repository root::

    python -m tests.helpers.ddp_scripts.plateau OUT_DIR

Rank 1 logs different validation scores than rank 0 (unsynced), so only rank 0's values decide. Every rank writes
``rank{r}.json`` (the epochs at whose start the stem trains, and the recorded history) and ``rank{r}.pt`` (its
parameters).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_partial import LayerFreezing
from tests.helpers.models import tiny_loader
from tests.helpers.plateau import RecordTrainable, ScriptedNet, plateau_freezing
from tests.helpers.trainers import SaveParamsPerRank, quiet_trainer


class WriteResult(Callback):
    def __init__(self, directory: Path, record: RecordTrainable) -> None:
        self.directory, self.record = directory, record

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        freezing = next(cb for cb in trainer.callbacks if isinstance(cb, LayerFreezing))  # type: ignore[attr-defined]
        result = {"trainable_at": self.record.trainable_at, "history": freezing.metric_recorder.history["val_score"]}
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main(out: Path) -> None:
    torch.manual_seed(0)
    record = RecordTrainable()
    callbacks = [plateau_freezing(), record, WriteResult(out, record), SaveParamsPerRank(out)]
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_epochs=9, callbacks=callbacks)
    trainer.fit(ScriptedNet(), tiny_loader(), tiny_loader(n=8))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
