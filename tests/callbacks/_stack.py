"""A small layer stack trained with AdamW, and a plain-PyTorch loop, for the LISA / BAdam / AdaptiveFreezing tests."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from tests.helpers.models import TinyNet, tiny_loader

LR = 1e-2


class Stack(TinyNet):
    """TinyNet (stem, ``blocks.0..n-1``, head) trained with AdamW (weight decay 0 unless given)."""

    def __init__(self, num_blocks: int = 4, lr: float = LR, weight_decay: float = 0.0, only_trainable: bool = False):
        super().__init__(num_blocks=num_blocks, lr=lr)
        self.weight_decay, self.only_trainable = weight_decay, only_trainable

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad or not self.only_trainable]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


def make(num_blocks: int = 4, **kwargs: Any) -> Stack:
    torch.manual_seed(0)
    return Stack(num_blocks, **kwargs)


def loader(n: int = 64, batch_size: int = 4) -> DataLoader:
    return tiny_loader(n=n, batch_size=batch_size)


def block_params(model: nn.Module, i: int) -> list[nn.Parameter]:
    return list(model.blocks[i].parameters())  # type: ignore[index]


def plain_loop(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    steps: int,
    active_at: Callable[[int], list[int]],
    drop_at: Callable[[int, list[int]], list[int]],
    interval: int,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    accumulate: int = 1,
) -> nn.Module:
    """Train ``model`` ``steps`` optimizer steps: at each period start, blocks ``active_at(step)`` train, the state of
    ``drop_at(step, active)`` is dropped. ``accumulate`` micro-batches per step (losses scaled as Lightning does)."""
    model = copy.deepcopy(model)
    opt = optimizer(model) if optimizer else torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    it = iter(batches)
    for step in range(steps):
        if step % interval == 0:
            active = active_at(step)
            for i, block in enumerate(model.blocks):  # type: ignore[attr-defined]
                for p in block.parameters():
                    p.requires_grad_(i in active)
                    if i not in active:
                        p.grad = None
            for i in drop_at(step, active):
                for p in block_params(model, i):
                    opt.state.pop(p, None)
        for _ in range(accumulate):
            x, y = next(it)
            (F.mse_loss(model(x), y) / accumulate).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs by {(p - q).abs().max().item():.3g}"
