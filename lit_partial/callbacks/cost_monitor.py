"""What a run costs, measured while it trains: FLOPs, saved activations, trainable elements, state, step time.

:class:`CostMonitor` (a measurement callback, like Lightning's ``ThroughputMonitor``; the main job's comparison
report is built from it) measures every ``every_n_steps``-th training batch with ``torch.utils.flop_counter``
(forward and backward FLOPs, split at ``on_before_backward`` / ``on_after_backward``) and
:class:`~lit_partial.functional.SavedTensorTracker` (bytes saved for backward when backward starts; beside it
:class:`~lit_partial.functional.LiveStorageCounter`'s ``live_forward_bytes``, the storages the forward
left alive, which include what selective checkpointing caches, invisible to saved-tensor hooks), counts
trainable parameter elements (``requires_grad`` minus elements masked by ``GradientMasking``) on every batch,
times the *other* batches (end of the previous batch to end of this one, so data loading and SelectiveBackprop's
scoring pass are included; the first batch of each epoch is left out), and reads the optimizer state after every
measured step and at the end: the largest is reported, as techniques that switch what trains (LISA, BAdam,
AdaptiveFreezing) grow and drop state during the run; the state at the end is ``final_optimizer_state_bytes``.
It only observes: a measured step computes exactly what an unmeasured one does, and holds what it holds (FLOPs are
counted without ``FlopCounterMode``'s module tracking, which would keep the graph below a ``.detach()`` alive).

Example:
    >>> import lightning as L
    >>> from lit_partial.demos import DigitsClassifier, DigitsDataModule
    >>> monitor = CostMonitor(every_n_steps=2)
    >>> trainer = L.Trainer(max_steps=4, callbacks=[monitor], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    >>> model = DigitsClassifier()
    >>> trainer.fit(model, DigitsDataModule())
    >>> costs = monitor.summary()  # FLOPs and bytes: the mean of steps 0 and 2; the time: median of steps 1 and 3
    >>> costs["steps"], costs["backward_flops"] > costs["forward_flops"] > 0
    (4, True)
    >>> costs["trainable_params"] == sum(p.numel() for p in model.parameters())  # nothing frozen or masked
    True
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from lit_partial._compat import compiled_parts, total_flop_counter
from lit_partial.errors import ConfigurationError, UnsupportedStructureError
from lit_partial.functional.activations import SavedTensorTracker
from lit_partial.functional.measure import LiveStorageCounter
from lit_partial.summary import summarize
from lit_partial.tree import leaves

__all__ = ["CostMonitor", "optimizer_state_bytes", "trainable_elements"]


def trainable_elements(model: torch.nn.Module) -> int:
    """Parameter elements that can change: ``requires_grad`` ones, less those a gradient mask holds fixed."""
    total = summarize(model)[-1]  # the "total" row; masked elements belong to parameters that require grad
    return total.trainable - total.masked


def optimizer_state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of every tensor in the optimizers' state (momentum, Adam moments, step counters)."""
    total = 0
    for opt in optimizers:
        for state in opt.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def _tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors of a batch; none when lit_partial cannot look inside it (then they count, if views are saved)."""
    try:
        return leaves(batch)
    except UnsupportedStructureError:
        return []


class CostMonitor(Callback):
    """Measure FLOPs, saved activation bytes, trainable elements, optimizer state and step time of a run.

    At the end of training, global rank 0 writes :meth:`summary` (plus ``name``, ``world_size`` and every scalar
    in ``trainer.callback_metrics``, e.g. ``val_acc``) to ``path`` as JSON; it is written by the process that
    trained, so it also works under ``ddp_spawn``. The summary itself is available as :meth:`summary`.

    Args:
        every_n_steps: Measure FLOPs and saved bytes on batches with ``batch_idx % n == 0``; time the others.
        path: Where to write the JSON summary; ``None`` writes nothing.
        name: The run's name in the summary (the comparison report's row label).
    """

    def __init__(self, every_n_steps: int = 2, path: str | Path | None = None, name: str = "") -> None:
        if type(every_n_steps) is not int or every_n_steps < 2:
            raise ConfigurationError(
                f"`every_n_steps` must be an int >= 2 (FLOPs are counted on one step in n, the others are timed), "
                f"got {every_n_steps!r}; e.g. every_n_steps=2."
            )
        self.every_n_steps = every_n_steps
        self.path = None if path is None else Path(path)
        self.name = name
        self.forward_flops: list[int] = []
        self.backward_flops: list[int] = []
        self.saved_bytes: list[int] = []
        self.live_bytes: list[int] = []  # storages the forward left alive (selective checkpointing's cache included)
        self.trainable: list[int] = []
        self.step_seconds: list[float] = []
        self.optimizer_bytes = 0  # the largest optimizer state read (measured steps and the end)
        self.final_optimizer_bytes = 0
        self._flops: FlopCounterMode | None = None
        self._tracker: SavedTensorTracker | None = None
        self._live: LiveStorageCounter | None = None
        self._before_backward = 0
        self._backward = 0
        self._saved = 0
        self._last_end: float | None = None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        compiled = compiled_parts(pl_module)
        if compiled:  # torch skips compiling a frame first run under a dispatch mode, and never retries it
            rank_zero_warn(
                f"CostMonitor: {', '.join(repr(n) for n in compiled)} of {type(pl_module).__name__} is compiled, "
                "and FLOPs are counted under a dispatch mode from the first batch, which makes torch.compile run "
                "those modules uncompiled for the whole run (step times are then the eager ones). Measure costs "
                "on an uncompiled run, or leave CostMonitor out of compiled runs."
            )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._close()
        self.trainable.append(trainable_elements(pl_module))
        if batch_idx % self.every_n_steps:
            return
        self._backward = self._saved = self._live_saved = 0
        self._tracker = SavedTensorTracker(exclude=[pl_module])
        self._tracker.__enter__()
        self._flops = total_flop_counter()  # FlopCounterMode's module tracking would keep cut-off graphs alive
        self._flops.__enter__()  # type: ignore[no-untyped-call]  # torch leaves FlopCounterMode untyped
        self._live = LiveStorageCounter(exclude=[pl_module, *_tensors(batch)])  # the batch is not an activation
        self._live.__enter__()  # the innermost mode: it leaves at on_before_backward, the forward's end

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._flops is not None and self._tracker is not None:
            self._before_backward = int(self._flops.get_total_flops())
            self._saved = max(self._saved, self._tracker.live_bytes())
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live_saved = max(self._live_saved, self._live.live_bytes())

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._flops is not None:
            self._backward += int(self._flops.get_total_flops()) - self._before_backward

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._flops is not None:
            total = int(self._flops.get_total_flops())
            self._close()
            self.forward_flops.append(total - self._backward)
            self.backward_flops.append(self._backward)
            self.saved_bytes.append(self._saved)
            self.live_bytes.append(self._live_saved)
            self.optimizer_bytes = max(self.optimizer_bytes, optimizer_state_bytes(list(trainer.optimizers)))
        elif batch_idx > 0 and self._last_end is not None:
            self.step_seconds.append(now - self._last_end)
        self._last_end = time.perf_counter()

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final_optimizer_bytes = optimizer_state_bytes(list(trainer.optimizers))
        self.optimizer_bytes = max(self.optimizer_bytes, self.final_optimizer_bytes)
        if self.path is not None and trainer.is_global_zero:
            metrics = {
                k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1
            }
            record: dict[str, Any] = {**metrics, "name": self.name, **self.summary()}
            record["world_size"] = trainer.world_size
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(record, indent=2) + "\n")

    def _close(self) -> None:
        flops, self._flops = self._flops, None
        tracker, self._tracker = self._tracker, None
        live, self._live = self._live, None
        if live is not None:
            live.__exit__(None, None, None)
        if flops is not None:
            flops.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # untyped in torch
        if tracker is not None:
            tracker.__exit__(None, None, None)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()

    def summary(self) -> dict[str, float | int]:
        """Means over the measured steps (FLOPs, saved bytes), all steps (trainable), peak state, median step time."""

        def mean(values: list[int]) -> float:
            return float(statistics.fmean(values)) if values else float("nan")

        return {
            "steps": len(self.trainable),
            "forward_flops": mean(self.forward_flops),
            "backward_flops": mean(self.backward_flops),
            "saved_activation_bytes": mean(self.saved_bytes),
            "live_forward_bytes": mean(self.live_bytes),
            "trainable_params": mean(self.trainable),
            "optimizer_state_bytes": self.optimizer_bytes,
            "final_optimizer_state_bytes": self.final_optimizer_bytes,
            "step_time_ms": 1000 * statistics.median(self.step_seconds) if self.step_seconds else float("nan"),
        }
