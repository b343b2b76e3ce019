"""A small torchvision-style ResNet (BasicBlock with BatchNorm), built here because torchvision is not usable.

Names follow torchvision's ``resnet18``: ``conv1``, ``bn1``, ``layer1.0`` ... ``layer2.1`` (``layer2.0``
downsamples), ``fc``. ``dropout`` adds a ``Dropout`` inside every block (after the first BatchNorm), so a
block that runs draws from the global RNG.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lit_partial import PartialBackpropMixin


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn plus the (possibly downsampled) identity, then relu."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.drop(F.relu(self.bn1(self.conv1(x))))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class TinyResNet(nn.Module):
    """conv1/bn1 (8 channels) -> layer1 (2 blocks, 8 ch) -> layer2 (2 blocks, 16 ch, stride 2) -> pool -> fc."""

    def __init__(self, num_classes: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(BasicBlock(8, 8, dropout=dropout), BasicBlock(8, 8, dropout=dropout))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2, dropout=dropout), BasicBlock(16, 16, dropout=dropout))
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: Tensor, skip: frozenset[str] = frozenset()) -> Tensor:
        """``skip``: block names (``"layer1.1"``) left out, as a hand-written reference for skipping."""
        h = F.relu(self.bn1(self.conv1(x)))
        for stage in ("layer1", "layer2"):
            for i, block in enumerate(getattr(self, stage)):
                if f"{stage}.{i}" not in skip:
                    h = block(h)
        return self.fc(h.mean((2, 3)))


class ResNetModule(PartialBackpropMixin, L.LightningModule):
    """:class:`TinyResNet` as ``self.net`` (names ``net.layer1.0`` ...), cross-entropy, plain SGD."""

    def __init__(self, dropout: float = 0.0, lr: float = 0.05) -> None:
        super().__init__()
        self.net, self.lr = TinyResNet(dropout=dropout), lr

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def image_loader(n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Fixed random 3x8x8 images with labels in 0..2, in a fixed order."""
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen))
    return DataLoader(data, batch_size=batch_size, shuffle=False)
