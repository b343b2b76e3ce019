"""A recurrent model for truncated BPTT: the digits read row by row as 8-step sequences.

Example:
    >>> import torch
    >>> model = DigitsRNN(hidden_size=16)
    >>> logits, h = model(torch.randn(4, 8, 8))
    >>> logits.shape, h.shape
    (torch.Size([4, 8, 10]), torch.Size([1, 4, 16]))
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lit_partial.demos.digits import _check_number
from lit_partial.module import PartialBackpropMixin

__all__ = ["DigitsRNN"]


class DigitsRNN(PartialBackpropMixin, L.LightningModule):
    """A GRU reading a digit's 8 rows that predicts the class after every row (``DigitsDataModule(sequence=True)``).

    The loss is the cross-entropy of every step's prediction, so every chunk of truncated BPTT has
    something to learn from; accuracy is that of the last step. With ``tbptt_steps=k`` the model trains
    with :meth:`~lit_partial.PartialBackpropMixin.tbptt_step` (manual optimization, one optimizer step per
    chunk of ``k`` rows, or per batch with ``accumulate=True``); with ``None`` it backpropagates through
    the whole sequence (automatic optimization).

    Args:
        hidden_size: GRU state size.
        tbptt_steps: Rows per truncated-BPTT chunk, or ``None`` for full backprop through time.
        accumulate: Accumulate the chunk gradients and step once per batch.
        lr: AdamW learning rate.
    """

    def __init__(
        self, hidden_size: int = 64, tbptt_steps: int | None = 4, accumulate: bool = False, lr: float = 3e-3
    ) -> None:
        super().__init__()
        if tbptt_steps is not None and (type(tbptt_steps) is not int or tbptt_steps < 1):
            raise ValueError(f"`tbptt_steps` must be a positive int or None (full BPTT), got {tbptt_steps!r}.")
        _check_number("lr", lr, low=0.0, low_open=True, example="3e-3")
        self.save_hyperparameters()
        self.automatic_optimization = tbptt_steps is None
        self.rnn = nn.GRU(8, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 10)
        self.val_acc = MulticlassAccuracy(num_classes=10)

    @override
    def forward(self, x: Tensor, hiddens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        out, hiddens = self.rnn(x, hiddens)
        return self.head(out), hiddens

    def chunk_step(self, chunk: Any, hiddens: Tensor | None) -> tuple[Tensor, Tensor]:
        """Loss of one chunk of rows (every row's prediction against the label) and the state after it."""
        x, y = chunk
        logits, hiddens = self(x, hiddens)
        return F.cross_entropy(logits.flatten(0, 1), y.repeat_interleave(x.shape[1])), hiddens

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        k = self.hparams["tbptt_steps"]
        if k is None:
            loss, _ = self.chunk_step(batch, None)
            self.log("train_loss", loss, prog_bar=True)
            return loss
        chunk_loss = self.tbptt_step(batch, k, self.chunk_step, accumulate=self.hparams["accumulate"])
        if chunk_loss is not None:  # None only for an empty batch
            self.log("train_loss", chunk_loss, prog_bar=True)
        return None  # manual optimization: the optimizer already stepped

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)[0][:, -1]
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        return torch.optim.AdamW(self.partial_param_groups(lr=self.hparams["lr"]))
