"""Classes the CLI tests build from the command line (their module is allowed with ``extra_target_roots``).

- ``KillAt`` kills its whole process group with SIGKILL at a chosen point, a crash for the resume tests:
  ``+callbacks.killer={_target_:tests.helpers.cli_targets.KillAt,step:7}``
  ``extra_target_roots=[tests.helpers.cli_targets]`` (run the job with ``start_new_session=True`` so that only
  the job's processes are in the group);
- ``BuggyClassifier`` has a bug in ``training_step``: its error must keep the full traceback (it is no
  configuration error).
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lit_partial.demos import DigitsClassifier


class KillAt(Callback):
    """SIGKILL the process group before optimizer step ``step`` runs, or when validation of ``epoch`` starts.

    Args:
        step: Kill at the start of the batch that would take optimizer step ``step + 1`` (``step`` steps, and the
            checkpoint after the last of them, are done).
        epoch: Kill when the validation of this epoch starts (the last batch's checkpoint is written, the
            validation-end one is not).
    """

    def __init__(self, step: int | None = None, epoch: int | None = None) -> None:
        self.step = step
        self.epoch = epoch

    @staticmethod
    def _kill() -> None:
        os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.step is not None and trainer.global_step == self.step:
            self._kill()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.epoch is not None and not trainer.sanity_checking and trainer.current_epoch == self.epoch:
            self._kill()


class BuggyClassifier(DigitsClassifier):
    """DigitsClassifier whose first training step divides by zero."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        raise ZeroDivisionError("a bug in training_step")
