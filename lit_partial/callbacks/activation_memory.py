"""``ActivationMemoryMonitor``: log the bytes the backward pass holds, every training step."""

from __future__ import annotations

from collections import deque
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lit_partial.callbacks.base import Technique
from lit_partial.errors import ConfigurationError
from lit_partial.functional.activations import SavedTensorTracker

__all__ = ["ActivationMemoryMonitor"]


class ActivationMemoryMonitor(Technique):
    """Log ``saved_activation_bytes``: what the graph keeps for backward when backward starts.

    From ``on_train_batch_start`` to ``on_train_batch_end`` a
    :class:`~lit_partial.functional.SavedTensorTracker` records every tensor autograd saves; just before each
    backward (``on_before_backward``) it counts the distinct storages still held (the model's parameters and
    buffers excluded). With several backward calls per batch (truncated BPTT, manual optimization) the
    largest count is logged. On a GPU it also logs ``max_memory_allocated_bytes``, the peak of
    ``torch.cuda.max_memory_allocated`` during the batch. Tensors kept by ``torch.utils.checkpoint`` or
    offloaded with ``save_on_cpu`` are not on the device and do not count. Nothing is installed on batches
    that are not measured, and nothing at all when the callback is not used.

    The values are logged with ``pl_module.log(..., on_step=True)`` (so they reach loggers and
    ``trainer.callback_metrics``) and kept exactly as ints in :attr:`history` (the last 10,000 measured steps).

    Args:
        every_n_steps: Measure every n-th training batch (``batch_idx % n == 0``).
        prog_bar: Show the value in the progress bar.
        name: Metric name of the saved bytes.

    Raises:
        ValueError: If ``every_n_steps`` is not a positive int or ``name`` is empty.

    Example:
        >>> from lit_partial.demos import DigitsClassifier, DigitsDataModule
        >>> monitor = ActivationMemoryMonitor()
        >>> trainer = L.Trainer(max_steps=1, callbacks=[monitor], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(DigitsClassifier(), DigitsDataModule())
        >>> len(monitor.history), monitor.history[0] > 0  # saved bytes of each measured step, as ints
        (1, True)
    """

    def __init__(self, every_n_steps: int = 1, prog_bar: bool = False, name: str = "saved_activation_bytes") -> None:
        super().__init__()
        if type(every_n_steps) is not int or every_n_steps < 1:
            raise ConfigurationError(
                f"`every_n_steps` must be a positive int, got {every_n_steps!r}; 1 measures every batch."
            )
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"`name` must be a non-empty metric name, got {name!r}.")
        self.every_n_steps = every_n_steps
        self.prog_bar = prog_bar
        self.name = name
        self.history: deque[int] = deque(maxlen=10_000)
        self._tracker: SavedTensorTracker | None = None
        self._peak = 0

    @override
    def config(self) -> dict[str, Any]:
        return {"every_n_steps": self.every_n_steps, "name": self.name}

    @override
    def run_summary(self) -> list[str]:
        if not self.history:
            return []
        mean = sum(self.history) / len(self.history)
        return [
            f"ActivationMemoryMonitor: {self.name} mean {mean / 2**20:.2f} MiB, "
            f"max {max(self.history) / 2**20:.2f} MiB over {len(self.history)} measured steps"
        ]

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._close()
        if batch_idx % self.every_n_steps:
            return
        self._peak = 0
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._tracker = SavedTensorTracker(exclude=[pl_module])
        self._tracker.__enter__()

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._tracker is not None:
            self._peak = max(self._peak, self._tracker.live_bytes())

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._tracker is None:
            return
        self._close()
        self.history.append(self._peak)
        pl_module.log(self.name, float(self._peak), on_step=True, on_epoch=False, prog_bar=self.prog_bar)
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device)
            pl_module.log("max_memory_allocated_bytes", float(peak), on_step=True, on_epoch=False)

    def _close(self) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            tracker.__exit__(None, None, None)

    @override
    def detach(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        self._close()
