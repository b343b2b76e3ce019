"""LightningModules and data for the activation-memory tests (ActivationDetach, the monitor, TBPTT)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_partial import PartialBackpropMixin
from lit_partial.demos import ResidualFFN

B, W, N = 4, 16, 4
UNIT = B * W * 4  # bytes of one (B, W) float32 activation


class FFNModule(PartialBackpropMixin, L.LightningModule):
    """ResidualFFN(N, W) regressing random targets with SGD; ``hand_detach`` writes ``.detach()`` by hand.

    Args:
        hand_detach: Detach the output of ``blocks.<i>`` in ``forward`` (the reference for ``at=``).
        detach_steps: Only while ``a <= global_step < b``.
    """

    def __init__(self, hand_detach: int | None = None, detach_steps: tuple[int, int] = (0, 10**9)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = ResidualFFN(N, W)
        self.hand_detach, self.detach_steps = hand_detach, detach_steps

    def forward(self, x: Tensor) -> Tensor:
        if self.hand_detach is None:
            return self.net(x)
        a, b = self.detach_steps
        cut = self.training and a <= self.global_step < b
        for i, block in enumerate(self.net.blocks):
            x = block(x)
            if cut and i == self.hand_detach:
                x = x.detach()
        return x

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return (self(x) - y).pow(2).sum()  # pow keeps (out - y); sum keeps nothing

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def ffn_loader(batches: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(
        TensorDataset(torch.randn(batches * B, W, generator=g), torch.randn(batches * B, W, generator=g)), batch_size=B
    )


def params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class SeqRNN(PartialBackpropMixin, L.LightningModule):
    """An Elman RNN written step by step (every step's saved tensors are known) for truncated BPTT tests.

    Per step it keeps the step input and the tanh output (the new state): (B, F) + (B, H) floats.
    """

    def __init__(
        self, k: int | None = 2, accumulate: bool = False, features: int = 3, hidden: int = 5, clip: float | None = None
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.rec, self.out = (
            nn.Linear(features, hidden),
            nn.Linear(hidden, hidden, bias=False),
            nn.Linear(hidden, 1),
        )
        self.k, self.accumulate, self.clip = k, accumulate, clip
        self.automatic_optimization = k is None
        self.hidden = hidden

    def chunk_step(self, chunk: Any, h: Tensor | None) -> tuple[Tensor, Tensor]:
        x, y = chunk
        h = torch.zeros(x.shape[0], self.hidden) if h is None else h
        loss = x.new_zeros(())
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            loss = loss + (self.out(h).squeeze(-1) - y[:, t]).pow(2).mean()
        return loss, h

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.k is None:
            return self.chunk_step(batch, None)[0]
        self.tbptt_step(batch, self.k, self.chunk_step, accumulate=self.accumulate, gradient_clip_val=self.clip)
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def seq_loader(batches: int = 2, steps: int = 6, batch: int = 2, features: int = 3) -> DataLoader:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batches * batch, steps, features, generator=g)
    y = torch.randn(batches * batch, steps, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)
