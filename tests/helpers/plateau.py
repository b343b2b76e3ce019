"""A scripted validation curve with two plateaus, for the metric-schedule tests and their 2-process run.

``ScriptedNet`` logs ``val_score = SCORES[epoch]`` (plus ``RANK1_SHIFT`` on rank 1, unsynced, so that only rank
0's values may decide), ``plateau_freezing`` unfreezes on its plateaus, ``RecordTrainable`` records when.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_partial import LayerFreezing
from tests.helpers.models import TinyNet

#: The validation score logged at the end of each epoch (rank 1 logs it plus RANK1_SHIFT, not synced).
SCORES = [1.0, 0.8, 0.82, 0.81, 0.7, 0.71, 0.72, 0.6, 0.61, 0.62]
RANK1_SHIFT = [0.0, 0.0, -0.5, -0.6, -0.2, -0.5, -0.6, 0.0, 0.0, 0.0]  # rank 1 alone: other plateaus


class ScriptedNet(TinyNet):
    """TinyNet whose validation logs ``val_score`` = SCORES[epoch] (plus RANK1_SHIFT on rank 1), unsynced."""

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        epoch = self.current_epoch
        value = SCORES[epoch] + (RANK1_SHIFT[epoch] if self.global_rank == 1 else 0.0)
        self.log("val_score", value)


class RecordTrainable(Callback):
    """The epochs at whose start ``stem.weight`` trains (put it after LayerFreezing)."""

    def __init__(self) -> None:
        self.trainable_at: dict[int, bool] = {}

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.trainable_at[trainer.current_epoch] = pl_module.stem.weight.requires_grad


def plateau_freezing(lr_scale: float = 1.0) -> LayerFreezing:
    when = {"plateau": "val_score", "mode": "min", "patience": 2}
    return LayerFreezing(
        frozen=["stem", "blocks"],
        schedule=[
            {"when": when, "unfreeze": "blocks", "lr_scale": lr_scale},
            {"when": when, "unfreeze": "stem"},
        ],
    )
