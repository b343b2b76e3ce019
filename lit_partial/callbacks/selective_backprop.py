"""``SelectiveBackprop``: score every sample without gradient, train only on the ones that matter.

A Lightning callback cannot replace the batch, so this one registers a batch transform on a
:class:`~lit_partial.PartialBackpropMixin` model (applied in its ``on_after_batch_transfer``). On every
training batch the transform runs a no-grad scoring forward of ``model.per_sample_loss(batch)``, picks
samples with one of the methods of :mod:`lit_partial.functional.selection_sampling`, and hands only those
to ``training_step``.

Design choices:

* **Scoring pass and BatchNorm.** ``score_mode="eval"`` (default) scores in eval mode: BatchNorm uses its
  running statistics and updates nothing, dropout is off and no global RNG is consumed, so the training
  forward is the only one that touches module state. ``score_mode="train"`` scores with batch statistics
  (as the training forward would) and restores every buffer and the global RNG afterwards, so running
  statistics are still updated exactly once per step.
* **Pooling (``method="probability"``).** Lightning runs one optimizer step per loaded batch and refuses a
  skipped ``training_step`` under DDP, so a step cannot wait for a full pool. Instead every step trains on
  exactly ``round(keep * B)`` samples taken oldest-first from a pool of selected samples; the pool absorbs
  the random number selected per batch. If it holds too few (the first steps, unlucky draws), the
  highest-loss unselected samples of the current batch top it up, so no step and no rank ever gets an
  empty or differently sized batch and ranks stay in lockstep. Samples beyond ``pool_size`` (default: the
  batch size) are dropped oldest-first as stale. For Jiang et al.'s full-size optimizer steps, set
  ``Trainer(accumulate_grad_batches=round(1 / keep))``.
* **Randomness** comes from a generator seeded by ``(seed, rank, global_step, scored batches)``, never from
  the global RNG: runs are reproducible and resume exactly (history, pool and counters are checkpointed).

Example:
    >>> import lightning as L
    >>> from lit_partial.demos import DigitsClassifier, DigitsDataModule
    >>> sb = SelectiveBackprop(keep=0.25, method="topk")
    >>> trainer = L.Trainer(max_steps=2, callbacks=[sb], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    >>> trainer.fit(DigitsClassifier(), DigitsDataModule(batch_size=64))
    >>> sb.backward_samples  # 2 steps of 16 of 64 samples
    32
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lit_partial.callbacks.base import Technique
from lit_partial.conditions import uniform_draw
from lit_partial.distributed import gather_objects, rank, world_size
from lit_partial.errors import ConfigurationError, UsageError
from lit_partial.functional.selection_sampling import (
    SamplePool,
    batch_size_of,
    num_kept,
    select_outliers,
    select_probability,
    select_topk,
    slice_batch,
    take_pooled,
    update_history,
)
from lit_partial.handles import register_batch_transform
from lit_partial.module import PartialBackpropMixin

__all__ = ["SelectiveBackprop"]


class _MissingPerSampleLoss(UsageError, NotImplementedError):
    """The model has no ``per_sample_loss`` to score samples with."""


class _DataModuleHookError(UsageError, RuntimeError):
    """The batch never reaches the model's ``on_after_batch_transfer`` (where the selection happens)."""


METHODS = ("topk", "probability", "outliers")
UNITS = ("fraction", "epoch", "step")
SCORE_MODES = ("eval", "train")


def _positive_int_or_none(value: Any, name: str, example: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"`{name}` must be a positive integer or None, got {value!r}; e.g. {example}.")


class SelectiveBackprop(Technique):
    """Backpropagate only selected samples of each training batch (high loss, or without outliers).

    Args:
        keep: Fraction of each batch that is trained on, in (0, 1]; ``round(keep * B)`` samples (at least 1).
        method: ``"topk"`` keeps the highest losses; ``"probability"`` keeps each sample with probability
            ``CDF(loss) ** (1 / keep - 1)`` over the last ``history_size`` losses and pools them (Jiang et al.
            2019); ``"outliers"`` drops the losses above the ``keep`` quantile (e.g. label noise).
        history_size: Losses remembered for the CDF of ``"probability"``.
        pool_size: Most selected samples held between steps by ``"probability"`` (default: the batch size).
        start: Start of the selective window, in ``unit`` (before it, full batches train).
        end: End of the window (exclusive), in ``unit``; ``None``: until the end of training.
        unit: ``"fraction"`` of the trainer's estimated optimizer steps, ``"epoch"`` or ``"step"`` (global step).
        full_batch_every_n_steps: Train on the full batch at every n-th optimizer step (global steps
            ``n - 1, 2n - 1, ...``), e.g. to keep low-loss samples from being forgotten; ``None``: never.
        score_mode: ``"eval"`` scores in eval mode; ``"train"`` scores with batch statistics and restores all
            buffers and the global RNG afterwards. Either way, running statistics update once per step.
        seed: Seed of the ``"probability"`` draws (combined with rank, global step and batch count).
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`); by default that is an error naming what changed.

    Attributes:
        forward_samples: Samples forwarded by this rank so far (scoring pass + training forward).
        backward_samples: Samples backpropagated by this rank so far.
        scored_samples: Samples forwarded by the scoring pass alone.

    Example:
        >>> sb = SelectiveBackprop(keep=0.5, method="outliers", start=1, unit="epoch")
        >>> sb.config()["method"], sb.config()["start"]
        ('outliers', 1)
    """

    def __init__(
        self,
        keep: float = 0.5,
        method: str = "topk",
        *,
        history_size: int = 1024,
        pool_size: int | None = None,
        start: float = 0.0,
        end: float | None = None,
        unit: str = "fraction",
        full_batch_every_n_steps: int | None = None,
        score_mode: str = "eval",
        seed: int = 0,
        accept_config_change: bool = False,
    ) -> None:
        super().__init__(accept_config_change=accept_config_change)
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ConfigurationError(
                f"`keep` must be a fraction in (0, 1], got {keep!r}; e.g. keep=0.25 trains on a quarter."
            )
        if method not in METHODS:
            raise ConfigurationError(f"`method` must be one of {METHODS}, got {method!r}.")
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
            raise ConfigurationError(f"`history_size` must be a positive integer, got {history_size!r}; e.g. 1024.")
        _positive_int_or_none(pool_size, "pool_size", "pool_size=256")
        if unit not in UNITS:
            raise ConfigurationError(f"`unit` must be one of {UNITS}, got {unit!r}.")
        if isinstance(start, bool) or not isinstance(start, (int, float)) or start < 0:
            raise ConfigurationError(f"`start` must be a number >= 0, got {start!r}.")
        if end is not None and (isinstance(end, bool) or not isinstance(end, (int, float)) or end <= start):
            raise ConfigurationError(f"`end` must be None or a number > start={start!r}, got {end!r}.")
        if unit == "fraction" and (start >= 1 or (end is not None and end > 1)):
            raise ConfigurationError(
                f"with unit='fraction', need 0 <= start < end <= 1, got start={start!r}, end={end!r}."
            )
        if unit != "fraction" and (start != int(start) or (end is not None and end != int(end))):
            raise ConfigurationError(
                f"with unit={unit!r}, `start` and `end` must be whole numbers, got {start!r}, {end!r}."
            )
        _positive_int_or_none(full_batch_every_n_steps, "full_batch_every_n_steps", "full_batch_every_n_steps=4")
        if score_mode not in SCORE_MODES:
            raise ConfigurationError(f"`score_mode` must be one of {SCORE_MODES}, got {score_mode!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"`seed` must be an integer, got {seed!r}.")
        self.keep, self.method, self.history_size, self.pool_size = float(keep), method, history_size, pool_size
        self.start, self.end, self.unit = start, end, unit
        self.full_batch_every_n_steps, self.score_mode, self.seed = full_batch_every_n_steps, score_mode, seed

        self.forward_samples = 0
        self.backward_samples = 0
        self.scored_samples = 0
        self._scored_batches = 0
        self._history: Tensor | None = None
        self._pool: SamplePool | None = None
        self._total_steps: float = math.inf
        self._transformed = False
        self._last: dict[str, float | Tensor] = {}
        self._last_drawn = 0.0

    @override
    def config(self) -> dict[str, Any]:
        names = ("keep", "method", "history_size", "pool_size", "start", "end", "unit", "full_batch_every_n_steps")
        return {name: getattr(self, name) for name in (*names, "score_mode", "seed")}

    @override
    def run_summary(self) -> list[str]:
        if not self.forward_samples:
            return []
        return [
            f"SelectiveBackprop ({self.method}, keep={self.keep}): backpropagated {self.backward_samples:,} samples, "
            f"scored {self.scored_samples:,}; {self.forward_samples:,} sample forwards in all"
        ]

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = type(pl_module).__name__
        if not isinstance(pl_module, PartialBackpropMixin):
            raise UsageError(
                f"SelectiveBackprop needs to replace the batch, which a callback cannot do on {name}. "
                f"Fix: declare `class {name}(PartialBackpropMixin, L.LightningModule)` and implement per_sample_loss."
            )
        if type(pl_module).per_sample_loss is PartialBackpropMixin.per_sample_loss:
            raise _MissingPerSampleLoss(
                f"SelectiveBackprop scores samples with {name}.per_sample_loss(batch), which is not implemented. "
                "Fix: return the unreduced loss of shape (B,), e.g. `F.cross_entropy(self(x), y, reduction='none')`."
            )
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning's data connector
        if datamodule is not None and is_overridden("on_after_batch_transfer", datamodule, L.LightningDataModule):
            raise _DataModuleHookError(
                f"{type(datamodule).__name__} overrides on_after_batch_transfer, so Lightning calls it instead of "
                f"{name}'s and SelectiveBackprop would silently never select. Fix: move that code into the model's "
                "on_after_batch_transfer (calling super()) or into the dataset / collate_fn."
            )
        self.handles.add(register_batch_transform(pl_module, self._transform))

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.unit == "fraction" and (self.start > 0 or (self.end is not None and self.end < 1)):
            self._total_steps = float(trainer.estimated_stepping_batches)
            if not math.isfinite(self._total_steps):
                raise ConfigurationError(
                    "SelectiveBackprop(unit='fraction') needs a known training length, but the trainer has neither "
                    "max_epochs nor max_steps. Fix: set one of them, or use unit='epoch' / unit='step'."
                )
        rank_zero_info(
            f"SelectiveBackprop: method={self.method}, keep={self.keep}, window [{self.start}, {self.end}) "
            f"{self.unit}s, scoring in {self.score_mode} mode."
        )

    def _selective_now(self, trainer: L.Trainer) -> bool:
        step, n = trainer.global_step, self.full_batch_every_n_steps
        if n is not None and step % n == n - 1:
            return False
        if self.unit == "epoch":
            position: float = trainer.current_epoch
        elif self.unit == "step":
            position = step
        else:
            position = step / self._total_steps if math.isfinite(self._total_steps) else 0.0
        return self.start <= position and (self.end is None or position < self.end)

    def _transform(self, batch: Any, dataloader_idx: int) -> Any:
        model = self.model
        if not isinstance(model, L.LightningModule) or not model.trainer.training:
            return batch
        trainer = model.trainer
        self._transformed = True
        size = batch_size_of(batch)
        if not self._selective_now(trainer):
            self._count(scored=0, trained=size)
            self._last = {"selected_fraction": 1.0}
            return batch
        losses = self._score(model, batch, size)
        keep_n = num_kept(size, self.keep)
        if self.method == "probability":
            batch_out, losses_out = self._select_pooled(trainer, batch, losses, keep_n)
        else:
            select = select_topk if self.method == "topk" else select_outliers
            index = select(losses, self.keep)
            batch_out, losses_out = slice_batch(batch, index), losses[index]
        self._scored_batches += 1
        self._count(scored=size, trained=keep_n)
        self._last = {
            "selected_fraction": keep_n / size,
            "loss_selected": losses_out.mean(),  # tensors: logging them needs no device sync here
            "loss_all": losses.mean(),
        }
        if self.method == "probability":
            self._last["drawn_fraction"] = self._last_drawn
        return batch_out

    def _score(self, model: L.LightningModule, batch: Any, size: int) -> Tensor:
        modes = {module: module.training for module in model.modules()}
        buffers = [b.detach().clone() for b in model.buffers()] if self.score_mode == "train" else []
        rng_devices = [model.device] if model.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(rng_devices), model.trainer.precision_plugin.forward_context():
                if self.score_mode == "eval":
                    model.eval()
                losses = model.per_sample_loss(batch)  # type: ignore[operator]  # checked in setup
        finally:
            for module, mode in modes.items():
                module.training = mode
            if buffers:
                with torch.no_grad():
                    for saved, buffer in zip(buffers, model.buffers(), strict=True):
                        buffer.copy_(saved)
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (size,):
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ConfigurationError(
                f"{type(model).__name__}.per_sample_loss(batch) must return one loss per sample, shape ({size},), "
                f"got {got}. Fix: use reduction='none' and average any other dimensions, e.g. `loss.mean(dim=1)`."
            )
        return losses.detach().float()

    def _generator(self, trainer: L.Trainer) -> torch.Generator:
        counters = (trainer.global_rank, trainer.global_step, self._scored_batches)
        draw = uniform_draw(self.seed, "SelectiveBackprop", *counters)
        return torch.Generator().manual_seed(int(draw * (1 << 53)))

    def _select_pooled(self, trainer: L.Trainer, batch: Any, losses: Tensor, keep_n: int) -> tuple[Any, Tensor]:
        if self._pool is None:
            self._pool = SamplePool(self.pool_size or batch_size_of(batch))
        elif self._pool.batch is not None:
            self._pool.batch = move_data_to_device(self._pool.batch, losses.device)
        self._history = update_history(self._history, losses, self.history_size)
        chosen = select_probability(losses, self._history, self.keep, self._generator(trainer))
        self._last_drawn = chosen.numel() / losses.numel()
        return take_pooled(self._pool, batch, losses, chosen, keep_n)

    def _count(self, scored: int, trained: int) -> None:
        self.scored_samples += scored
        self.forward_samples += scored + trained
        self.backward_samples += trained

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._transformed:
            raise _DataModuleHookError(
                "SelectiveBackprop's batch transform did not run on this training batch, so it would silently train "
                "on full batches. Fix: call `super().on_after_batch_transfer(batch, dataloader_idx)` in "
                f"{type(pl_module).__name__}.on_after_batch_transfer (and do not take `dataloader_iter` in "
                "training_step)."
            )
        self._transformed = False

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = {f"selective/{key}": value for key, value in self._last.items()}
        metrics["selective/forward_samples"] = float(self.forward_samples)
        metrics["selective/backward_samples"] = float(self.backward_samples)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    @override
    def technique_state(self) -> dict[str, Any]:
        mine = {
            "forward_samples": self.forward_samples,
            "backward_samples": self.backward_samples,
            "scored_samples": self.scored_samples,
            "scored_batches": self._scored_batches,
            "history": self._history,
            "pool": None if self._pool is None else {"capacity": self._pool.capacity, **self._pool.state_dict()},
        }
        if world_size() == 1:
            return mine
        # Each rank scores and pools its own samples, and Lightning writes rank 0's callback state only: keep every
        # rank's (a collective; Lightning calls state_dict on every rank when it saves a checkpoint).
        return {"per_rank": gather_objects(mine)}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        if "per_rank" in state:
            saved = state["per_rank"]
            if len(saved) != world_size():
                rank_zero_warn(
                    f"SelectiveBackprop: the checkpoint holds the state of {len(saved)} ranks, this run has "
                    f"{world_size()}; each rank continues from the saved rank of the same number (ranks beyond "
                    "start with an empty loss history and pool), so the resumed run is not exact."
                )
            if rank() >= len(saved):
                return
            state = saved[rank()]
        self.forward_samples = int(state["forward_samples"])
        self.backward_samples = int(state["backward_samples"])
        self.scored_samples = int(state["scored_samples"])
        self._scored_batches = int(state["scored_batches"])
        self._history = state["history"]
        pool = state["pool"]
        self._pool = None
        if pool is not None:
            self._pool = SamplePool(int(pool["capacity"]))
            self._pool.load_state_dict(pool)
