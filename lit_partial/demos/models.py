"""Plain ``nn.Module`` s used by the main job, the tests and the benchmarks.

Example:
    >>> import torch
    >>> DigitsCNN()(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    >>> ResidualFFN(num_blocks=2, width=8)(torch.randn(3, 8)).shape
    torch.Size([3, 8])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ConvBlock", "DigitsCNN", "FFNBlock", "ResidualConvBlock", "ResidualFFN"]


class ConvBlock(nn.Sequential):
    """Conv 3x3 -> BatchNorm -> ReLU, optionally followed by 2x2 max pooling."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        super().__init__(*layers)


class ResidualConvBlock(nn.Module):
    """``x + ConvBlock(c, c)(x)``: a shape-preserving block (what stochastic depth can skip)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = ConvBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out: Tensor = x + self.body(x)
        return out


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits: ``backbone`` (conv blocks ``backbone.0`` ... + global pooling) and ``head``.

    Args:
        channels: Output channels of each conv block; a 2x2 pool follows every block but the last.
        num_classes: Number of classes of the head.
        dropout: Dropout before the head.
        residual_blocks: Shape-preserving residual blocks ``backbone.res.0`` ... after the last conv block
            (for ``StochasticDepth``); 0 (default) builds exactly the plain backbone.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        num_classes: int = 10,
        dropout: float = 0.1,
        residual_blocks: int = 0,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("`channels` is empty; give at least one conv block width, e.g. [32, 64].")
        blocks: list[nn.Module] = []
        in_ch = 1
        for i, out_ch in enumerate(channels):
            blocks.append(ConvBlock(in_ch, out_ch, pool=i < len(channels) - 1))
            in_ch = out_ch
        if isinstance(residual_blocks, bool) or not isinstance(residual_blocks, int) or residual_blocks < 0:
            raise ValueError(f"`residual_blocks` must be a non-negative integer, got {residual_blocks!r}.")
        if residual_blocks == 0:
            self.backbone = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        else:  # keep the plain names (backbone.0 ... pool, flatten) and add backbone.res.* before the pooling
            layers: OrderedDict[str, nn.Module] = OrderedDict((str(i), b) for i, b in enumerate(blocks))
            layers["res"] = nn.Sequential(*(ResidualConvBlock(in_ch) for _ in range(residual_blocks)))
            layers[str(len(blocks))] = nn.AdaptiveAvgPool2d(1)
            layers[str(len(blocks) + 1)] = nn.Flatten()
            self.backbone = nn.Sequential(layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_ch, num_classes))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out: Tensor = self.head(self.backbone(x))
        return out


class FFNBlock(nn.Module):
    """A residual feed-forward block ``x + fc2(relu(fc1(x)))``: every block costs the same FLOPs."""

    def __init__(self, width: int, expansion: int = 1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width * expansion)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width * expansion, width)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out: Tensor = x + self.fc2(self.act(self.fc1(x)))
        return out


class ResidualFFN(nn.Module):
    """``num_blocks`` equal residual FFN blocks (``blocks.0`` ... ``blocks.N-1``), the benchmark model.

    Only the blocks have parameters, so freezing ``k`` of ``N`` blocks costs exactly ``1 - 2k/(3N)`` of
    the training FLOPs (the frozen prefix needs no backward at all).
    """

    def __init__(self, num_blocks: int = 8, width: int = 384, expansion: int = 1) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(FFNBlock(width, expansion) for _ in range(num_blocks)))

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        out: Tensor = self.blocks(x)
        return out
