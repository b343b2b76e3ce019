"""Digits training runs for the selective-backprop section: harder data sets, compute counters, curves.

``train(...)`` fits the main job's ``DigitsClassifier`` on :class:`HardDigits` (digits with optional label noise
and class imbalance in the training set; validation stays clean and balanced) and records, at every
validation, the accuracy, the backpropagated samples and the compute in sample units (scoring forward +
training forward + 2 x backward).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from torch.utils.data import TensorDataset
from typing_extensions import override

from benchmarks._noise import flip_labels, imbalanced_indices
from lit_partial import SelectiveBackprop
from lit_partial.demos import DigitsClassifier, DigitsDataModule


class HardDigits(DigitsDataModule):
    """Digits whose *training* split has ``noise`` of its labels flipped and/or classes thinned by ``imbalance``.

    Args:
        batch_size: Samples per training batch.
        noise: Fraction of training labels flipped to another class (exactly, seeded by ``data_seed``).
        imbalance: Factor of training samples kept per class, e.g. ``{5: 0.1, ..., 9: 0.1}`` (> 1 repeats samples).
        data_seed: Seed of the noise and the imbalance draws.
    """

    def __init__(
        self, batch_size: int, noise: float = 0.0, imbalance: Mapping[int, float] | None = None, data_seed: int = 0
    ) -> None:
        super().__init__(batch_size=batch_size)
        self.noise, self.imbalance, self.data_seed = noise, dict(imbalance or {}), data_seed
        self._hardened = False

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self._hardened or self.train_set is None:
            return
        x, y = self.train_set.tensors
        if self.imbalance:
            index = imbalanced_indices(y, self.imbalance, seed=self.data_seed)
            x, y = x[index], y[index]
        if self.noise:
            y, _ = flip_labels(y, self.noise, num_classes=10, seed=self.data_seed)
        self.train_set = TensorDataset(x, y)
        self._hardened = True


@dataclass
class Curve(Callback):
    """At every validation records (val_acc, backward samples, compute units, training seconds).

    Compute units: scoring forward + training forward + 2 x backward samples (backward = 2 forward units).
    Training seconds: wall time since training started, validation excluded (noisy on a shared machine).
    """

    selective: SelectiveBackprop | None = None
    trained: int = 0
    points: list[tuple[float, int, int, float]] = field(default_factory=list)
    _start: float = 0.0
    _val_start: float = 0.0
    _val_seconds: float = 0.0

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.trained += len(batch[1])  # the batch after selection: what training_step forwards and backprops

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        self._val_seconds += now - self._val_start
        if trainer.sanity_checking:
            return
        scored = self.selective.scored_samples if self.selective else 0
        compute = scored + self.trained + 2 * self.trained  # scoring fwd + training fwd + backward (2 units)
        seconds = now - self._start - self._val_seconds
        self.points.append((float(trainer.callback_metrics["val_acc"]), self.trained, compute, seconds))

    def first_reaching(self, target: float) -> tuple[int, int, float] | None:
        """(backpropagated samples, compute, training seconds) at the first validation with accuracy >= ``target``."""
        for acc, backward, compute, seconds in self.points:
            if acc >= target:
                return backward, compute, seconds
        return None

    def final(self, last: int = 5) -> float:
        """Mean validation accuracy over the last ``last`` validations (steadier than the very last one)."""
        tail = [p[0] for p in self.points[-last:]]
        return sum(tail) / len(tail)


def train(
    seed: int,
    epochs: int,
    batch: int,
    selective: Mapping[str, Any] | None = None,
    *,
    noise: float = 0.0,
    imbalance: Mapping[int, float] | None = None,
    val_every: int | float = 5,
    model: Mapping[str, Any] | None = None,
) -> Curve:
    """One fit of the digits main job; ``selective`` holds ``SelectiveBackprop`` arguments (None: plain training).

    ``val_every``: validate every that many training batches (an int) or fraction of an epoch (a float).
    """
    L.seed_everything(seed, verbose=False)
    cb = SelectiveBackprop(**selective) if selective else None
    curve = Curve(cb)
    trainer = L.Trainer(
        max_epochs=epochs,
        val_check_interval=val_every,
        accelerator="cpu",
        devices=1,
        callbacks=[curve, *([cb] if cb else [])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = HardDigits(batch, noise=noise, imbalance=imbalance, data_seed=seed)
    trainer.fit(DigitsClassifier(**(model or {})), data)
    return curve
