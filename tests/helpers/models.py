"""Tiny models and data shared by many tests: ``TinyNet`` (stem, residual blocks, gate, head) and its loaders."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lit_partial import PartialBackpropMixin
from lit_partial.demos.models import FFNBlock


class TinyNet(PartialBackpropMixin, L.LightningModule):
    """``stem`` (Linear 4->8), residual ``blocks.0..n-1`` (FFNBlock(8)), gate ``features``, ``head`` (Linear 8->2).

    Args:
        num_blocks: Residual blocks; 0 gives a model without them (the reference for skipped blocks).
        lr: Plain SGD learning rate (no momentum, so parameter updates are easy to compare).
        raw_detach_stem: Detach the stem output by hand on every other step (what users write without lit_partial).
    """

    def __init__(self, num_blocks: int = 3, lr: float = 0.1, raw_detach_stem: bool = False) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.Sequential(*(FFNBlock(8) for _ in range(num_blocks)))
        self.head = nn.Linear(8, 2)
        self.lr, self.raw_detach_stem = lr, raw_detach_stem

    @override
    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        if self.raw_detach_stem and self.training and self.trainer.global_step % 2 == 0:
            h = h.detach()
        return self.head(self.gate("features", self.blocks(h)))

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def tiny_data(n: int = 32, seed: int = 0, shift: float = 0.0) -> TensorDataset:
    """A fixed regression set: ``x`` (n, 4) shifted by ``shift``, ``y`` (n, 2)."""
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=gen) + shift, torch.randn(n, 2, generator=gen))


def tiny_loader(n: int = 32, batch_size: int = 8, seed: int = 0, shift: float = 0.0) -> DataLoader:
    """Batches of :func:`tiny_data` in a fixed order."""
    return DataLoader(tiny_data(n, seed, shift), batch_size=batch_size, shuffle=False)
