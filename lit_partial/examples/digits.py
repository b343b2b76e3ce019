"""The main job's data and LightningModule: scikit-learn's digits (offline), a CNN, accuracy.

Example:
    >>> dm = DigitsDataModule(batch_size=32)
    >>> dm.setup("fit")
    >>> len(dm.train_set), len(dm.val_set)
    (1437, 360)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit_partial.examples.models import ConvBlock, DigitsCNN, ResidualConvBlock
from lit_partial.module import PartialBackpropMixin

__all__ = ["DigitsClassifier", "DigitsDataModule", "load_digits_tensors"]


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``(N, 1, 8, 8)`` float images scaled to [0, 1] and ``(N,)`` int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install 'lit-partial[demo]'") from err
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, dtype=torch.int64)


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits with a fixed, stratified train/val split (no download).

    Args:
        batch_size: Samples per batch (per process under DDP).
        val_fraction: Fraction of the 1797 images held out for validation.
        split_seed: Seed of the split; the same seed always gives the same split.
        num_workers: DataLoader workers (0 is fastest for this tiny dataset).
        sequence: Return images as ``(B, 8, 8)`` sequences of 8 rows (for recurrent models).
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        num_workers: int = 0,
        sequence: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}; 0.2 holds out 360 images.")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        from sklearn.model_selection import train_test_split

        images, labels = load_digits_tensors()
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

    @override
    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=self.hparams["batch_size"], shuffle=True, num_workers=self.hparams["num_workers"]
        )

    @override
    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256, num_workers=self.hparams["num_workers"])


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
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        dropout: float = 0.1,
        residual_blocks: int = 0,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"`lr` must be positive, got {lr!r}.")
        self.save_hyperparameters()
        net = DigitsCNN(channels=list(channels), num_classes=10, dropout=dropout, residual_blocks=residual_blocks)
        self.backbone, self.head = net.backbone, net.head
        self.val_acc = MulticlassAccuracy(num_classes=10)

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
        return self.head(self.gate("features", self.backbone(x)))

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
