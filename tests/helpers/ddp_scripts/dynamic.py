"""A 2-process DDP run of every ConditionalDetach/StochasticDepth rule type, for the conditional-detach tests.

Run as a module from the repository root (plain ``strategy="ddp"`` re-launches it, so it cannot run inside
pytest)::

    python -m tests.helpers.ddp_scripts.dynamic OUT_DIR [--strategy ddp] [--raw]

Each rank trains on its own data (rank 0 shifted up, rank 1 down, so a statistic rule decides differently
per rank), then writes its parameters (``rank{r}.pt``) and its rule fractions (``fractions{r}.json``).
``--raw`` writes the same detach by hand (no callback), to show what plain DDP does without lit_partial.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_partial import ConditionalDetach, StochasticDepth
from tests.helpers.models import TinyNet, tiny_loader
from tests.helpers.trainers import SaveParamsPerRank, quiet_trainer


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
