"""Tiny models for the ConditionalDetach/ConditionalSkip tests, and a 2-process DDP run of every rule type.

Run as a script (plain ``strategy="ddp"`` re-launches this file, so it cannot run inside pytest)::

    python tests/_ddp_script_dynamic.py OUT_DIR [--strategy ddp] [--raw]

Each rank trains on its own data (rank 0 shifted up, rank 1 down, so a statistic rule decides differently
per rank), then writes its parameters (``rank{r}.pt``) and its rule fractions (``fractions{r}.json``).
``--raw`` writes the same detach by hand (no callback), to show what plain DDP does without lit_partial.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

if __name__ == "__main__":  # run as a script: make `lit_partial` and `tests` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_partial import ConditionalDetach, PartialBackpropMixin, StochasticDepth
from lit_partial.examples.models import FFNBlock
from tests.helpers import SaveParamsPerRank, quiet_trainer


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


class RankData(L.LightningDataModule):
    """Different data per rank: rank 0 shifted by +3, rank 1 by -3 (read once the process group exists)."""

    @override
    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        return tiny_loader(n=40, seed=10 + rank, shift=3.0 if rank == 0 else -3.0)


class SaveFractions(Callback):
    """Every rank writes the fractions of each lit_partial callback to ``dir/fractions{rank}.json``, and per
    optimizer step the parameters that got no gradient (after DDP's reduction) to ``dir/no_grad{rank}.json``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.no_grad: list[list[str]] = []

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.no_grad.append(sorted(n for n, p in pl_module.named_parameters() if p.grad is None))

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = {type(cb).__name__: cb.fractions() for cb in trainer.callbacks if hasattr(cb, "fractions")}
        (self.directory / f"fractions{trainer.global_rank}.json").write_text(json.dumps(out))
        (self.directory / f"no_grad{trainer.global_rank}.json").write_text(json.dumps(self.no_grad))


def ddp_callbacks() -> list[Callback]:
    """Every rule type at once: statistic (differs per rank), gate, random, grad_scale, per-sample, skip."""
    return [
        ConditionalDetach(
            {
                "stem": {"stat": "mean", "op": ">", "value": 0.0},  # rank 0 detaches, rank 1 does not
                "features": {"every_n_steps": 3},  # a gate: every 3rd step nothing below the head learns
                "blocks.0.fc1": {"probability": 0.5, "seed": 1},  # random, identical on both ranks
                "blocks.1.fc1": {"when": {"steps": [0, 3]}, "grad_scale": -0.5},  # reversed, then normal
                "blocks.1.fc2": {"when": {"stat": "mean", "op": ">", "value": 0.0}, "per_sample": True},
                "blocks.2.fc1": {"epochs": [0, 1]},  # first epoch only
            }
        ),
        StochasticDepth(blocks="blocks.*", drop_rate=0.5, seed=3),
    ]


def main(out: str | Path, strategy: str = "ddp", raw: bool = False, max_steps: int = 6) -> None:
    """Train TinyNet on 2 CPU processes with every rule type; write per-rank parameters and fractions."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    callbacks: list[Callback] = [SaveParamsPerRank(out)]
    if not raw:
        callbacks += [*ddp_callbacks(), SaveFractions(out)]
    trainer = quiet_trainer(
        strategy=strategy, devices=2, max_steps=max_steps, callbacks=callbacks, use_distributed_sampler=False
    )
    trainer.fit(TinyNet(raw_detach_stem=raw), datamodule=RankData())


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--raw", action="store_true")
    args = parser.parse_args()
    main(args.out, args.strategy, args.raw)
