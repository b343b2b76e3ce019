"""The main job's data and LightningModule: scikit-learn's digits (offline), a CNN, accuracy.

Example:
    >>> dm = DigitsDataModule(batch_size=32)
    >>> dm.setup("fit")
    >>> len(dm.train_set), len(dm.val_set)
    (1437, 360)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit_partial.demos.models import ConvBlock, DigitsCNN, ResidualConvBlock
from lit_partial.errors import CheckpointMismatchError, ConfigurationError
from lit_partial.module import PartialBackpropMixin

__all__ = [
    "DigitsClassifier",
    "DigitsDataModule",
    "EpochSampler",
    "ResumableDataLoader",
    "load_digits_tensors",
    "trainer_batches_done",
]


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` float images scaled to [0, 1] and ``(N,)`` int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install 'lit-partial[demo]'") from err
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.int64)


class EpochSampler(DistributedSampler[int]):
    """A per-epoch seeded shuffle (``DistributedSampler``'s) that can start in the middle of an epoch.

    The order of epoch ``e`` depends only on ``(seed, e)``, never on the global RNG, so a resumed run sees
    the same batches as the uninterrupted one; :meth:`skip_batches` makes the next iteration of the current
    epoch start after the batches already trained. Being a ``DistributedSampler``, Lightning keeps it
    under DDP instead of replacing it (each rank gets its own slice of the same permutation).

    Example:
        >>> sampler = EpochSampler(range(6), seed=0)
        >>> full = list(sampler)
        >>> sampler.skip_batches(2, batch_size=2)
        >>> list(sampler) == full[4:], len(list(sampler))
        (True, 6)
    """

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._skip = 0

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """Start the next iteration (only the next one) after ``batches`` batches of ``batch_size``."""
        self._skip = batches * batch_size

    @override
    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self._skip = self._skip, 0
        return iter(indices[skip:])


def trainer_batches_done(trainer: L.Trainer | None) -> tuple[int, bool]:
    """Batches of the current epoch ``trainer`` has finished, and whether they end it (``(0, False)`` without one).

    What a :class:`ResumableDataLoader` of a LightningDataModule passes as ``batches_done``.
    """
    if trainer is None:
        return 0, False
    done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)  # type: ignore[attr-defined]  # untyped in Lightning
    return done, done >= trainer.num_training_batches


class ResumableDataLoader(DataLoader[Any]):
    """A ``DataLoader`` over an :class:`EpochSampler` whose position is saved in Lightning checkpoints.

    Lightning stores ``state_dict()`` of a training dataloader that has one (``_Stateful``) in every
    checkpoint, and calls ``load_state_dict`` before the first batch of a resumed run: the resumed epoch
    then continues with the batch after the last one trained, in the same order.

    Args:
        *args: Passed to ``DataLoader``; ``sampler`` must be an :class:`EpochSampler`.
        batches_done: Returns how many batches of the current epoch the training loop has finished (the
            prefetched batch Lightning holds is not one of them) and whether that ends the epoch (Lightning may
            cut epochs short with ``limit_train_batches``); ``None`` counts nothing (plain PyTorch use).
        **kwargs: Passed to ``DataLoader``.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], tuple[int, bool]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSampler):
            raise ConfigurationError(f"ResumableDataLoader needs an EpochSampler, got {type(self.sampler).__name__}.")
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        """The epoch, the batches of it already trained, and what the order depends on (plain ints)."""
        sampler = self.sampler
        assert isinstance(sampler, EpochSampler)
        done, finished = self._batches_done() if self._batches_done is not None else (0, False)
        return {
            "epoch": int(sampler.epoch),
            "batches_done": int(done),
            "epoch_finished": int(finished),
            "seed": int(sampler.seed),
            "batch_size": int(self.batch_size or 0),
            "num_replicas": int(sampler.num_replicas),
            "dataset_size": len(sampler.dataset),  # type: ignore[arg-type]  # a map-style dataset
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue the saved epoch after its trained batches.

        Raises:
            CheckpointMismatchError: If the checkpoint was written with a different shuffle seed, batch size,
                number of processes or data set: the saved position would then point at other samples.
        """
        sampler = self.sampler
        assert isinstance(sampler, EpochSampler)
        now = self.state_dict()
        changed = {
            k: (state[k], now[k])
            for k in ("seed", "batch_size", "num_replicas", "dataset_size")
            if state.get(k) != now[k]
        }
        if changed:
            diffs = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise CheckpointMismatchError(
                f"the checkpoint's training data position was saved with different data settings ({diffs}); "
                "resume with the same data.* and trainer.devices settings, or start a new run without ckpt_path."
            )
        if state.get("epoch_finished"):  # saved on the last batch: the next epoch comes next, from its start
            sampler.set_epoch(int(state["epoch"]) + 1)
            return
        sampler.set_epoch(int(state["epoch"]))
        sampler.skip_batches(int(state["batches_done"]), int(self.batch_size or 0))


def _check_classes(classes: Sequence[int] | None) -> list[int] | None:
    if classes is None:
        return None
    values = list(classes)
    ok = len(values) >= 2 and all(type(c) is int and 0 <= c <= 9 for c in values) and len(set(values)) == len(values)
    if not ok:
        raise ConfigurationError(
            f"`classes` must list at least two different digits from 0 to 9, got {classes!r}; e.g. [5, 6, 7, 8, 9] "
            "(null: all ten)."
        )
    return values


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits with a fixed, stratified train/val split (no download), resumable mid-epoch.

    ``classes`` keeps a subset of the digits and relabels them ``0 .. len(classes) - 1`` in the given order:
    the transfer-learning job pretrains on ``[0, 1, 2, 3, 4]`` and fine-tunes on ``[5, 6, 7, 8, 9]``.
    The training order is a seeded shuffle per epoch (:class:`EpochSampler`); the position in the epoch is
    saved in checkpoints, so a run resumed from any step sees exactly the batches the uninterrupted run saw.

    Args:
        batch_size: Samples per batch (per process under DDP).
        val_fraction: Fraction of the images held out for validation.
        split_seed: Seed of the split; the same seed always gives the same split.
        num_workers: DataLoader workers (0 is fastest for this tiny dataset).
        sequence: Return images as ``(B, 8, 8)`` sequences of 8 rows (for recurrent models).
        classes: The digits to keep, relabelled by position; ``None`` keeps all ten with their own labels.
        shuffle_seed: Seed of the per-epoch training order.

    Raises:
        ConfigurationError: A non-positive ``batch_size``, ``val_fraction`` outside (0, 1), or ``classes``
            that are not at least two distinct digits.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        sequence: bool = False,
        classes: Sequence[int] | None = None,
        shuffle_seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if not (isinstance(val_fraction, int | float) and 0.0 < val_fraction < 1.0):
            raise ConfigurationError(
                f"`val_fraction` must be in (0, 1), got {val_fraction!r}; 0.2 holds out a fifth of the images."
            )
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigurationError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
        classes = _check_classes(classes)  # a plain list: checkpoints load with weights_only=True
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @property
    def num_classes(self) -> int:
        """How many labels the data has (``len(classes)``, or 10)."""
        classes = self.hparams["classes"]
        return 10 if classes is None else len(classes)

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        from sklearn.model_selection import train_test_split

        images, labels = load_digits_tensors()
        classes = self.hparams["classes"]
        if classes is not None:
            keep = torch.isin(labels, torch.tensor(classes))
            relabel = torch.zeros(10, dtype=torch.int64)
            relabel[torch.tensor(classes)] = torch.arange(len(classes))
            images, labels = images[keep], relabel[labels[keep]]
        if self.hparams["sequence"]:
            images = images.squeeze(1)
        train_idx, val_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=self.hparams["val_fraction"],
            random_state=self.hparams["split_seed"],
            stratify=labels.numpy(),
        )
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def _sets(self) -> tuple[TensorDataset, TensorDataset]:
        if self.train_set is None or self.val_set is None:
            self.setup("fit")
        assert self.train_set is not None and self.val_set is not None
        return self.train_set, self.val_set

    def _batches_done(self) -> tuple[int, bool]:
        return trainer_batches_done(self.trainer)

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        train_set = self._sets()[0]
        sampler = EpochSampler(train_set, num_replicas=replicas, rank=rank, seed=self.hparams["shuffle_seed"])
        return ResumableDataLoader(
            train_set,
            batch_size=self.hparams["batch_size"],
            sampler=sampler,
            num_workers=self.hparams["num_workers"],
            generator=torch.Generator().manual_seed(self.hparams["shuffle_seed"]),  # worker seeds: not the global RNG
            batches_done=self._batches_done,
        )

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self._sets()[1], batch_size=256, num_workers=self.hparams["num_workers"])


def _check_number(
    name: str,
    value: Any,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    example: str,
) -> None:
    """Raise a ConfigurationError unless ``value`` is a finite real number in the range (NaN and inf never are)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")
        raise ConfigurationError(f"`{name}` must be a finite number {bounds}, got {value!r}; e.g. {name}={example}.")


class DigitsClassifier(PartialBackpropMixin, L.LightningModule):
    """Digits classification with a ``backbone``/``head`` CNN, ready for every lit_partial technique.

    ``forward`` passes the backbone's features through the gate ``"features"``, ``per_sample_loss``
    returns unreduced cross-entropy, and the optimizer uses :meth:`partial_param_groups`.

    Args:
        channels: Conv block widths of the backbone.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        dropout: Dropout before the head.
        residual_blocks: Shape-preserving residual conv blocks ``backbone.res.*`` after the last conv block
            (what ``StochasticDepth`` skips); 0 (default) keeps the plain CNN.
        num_classes: Outputs of the head (``DigitsDataModule.num_classes``).

    Raises:
        ConfigurationError: ``lr`` not a finite positive number, ``weight_decay`` negative or not finite,
            ``dropout`` outside [0, 1], ``num_classes`` below 2.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.1,
        residual_blocks: int = 0,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        _check_number("lr", lr, low=0.0, low_open=True, example="3e-3")
        _check_number("weight_decay", weight_decay, low=0.0, example="1e-4")
        _check_number("dropout", dropout, low=0.0, high=1.0, example="0.1")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigurationError(f"`num_classes` must be an integer >= 2, got {num_classes!r}.")
        channels = [int(c) for c in channels]  # a plain list: checkpoints load with weights_only=True
        self.save_hyperparameters()
        net = DigitsCNN(channels=channels, num_classes=num_classes, dropout=dropout, residual_blocks=residual_blocks)
        self.backbone, self.head = net.backbone, net.head
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)

    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` every block with parameters, then the root.

        Lightning calls this after the callbacks' ``setup`` and before the optimizers; under any other strategy
        (no device mesh) it does nothing. One call per block lets FSDP2 all-gather one block at a time.
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):  # configure_model runs again for a second fit / validate: already sharded
            return
        residual = [m for m in self.backbone.modules() if isinstance(m, ResidualConvBlock)]
        inner = {id(m) for r in residual for m in r.modules()}
        convs = [m for m in self.backbone.modules() if isinstance(m, ConvBlock) and id(m) not in inner]
        for block in [*convs, *residual, self.head]:
            fully_shard(block, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])

    @override
    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.head(self.gate("features", self.backbone(x)))
        return logits

    @override
    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        hp = self.hparams
        return torch.optim.AdamW(self.partial_param_groups(lr=hp["lr"], weight_decay=hp["weight_decay"]))
