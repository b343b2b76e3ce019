"""Every lit_partial callback trained on 2 CPU processes under FSDP2 and under DDP, for the FSDP2 tests.

Run as a script (both strategies re-launch this file per rank, so it cannot run inside pytest)::

    python tests/distributed/_fsdp_scenarios.py OUT_DIR [--only name,name] [--strategies fsdp2,ddp]

Once launched, one process group serves every run: each scenario is trained with each strategy in turn
(about a second per fit). Each rank trains on its own data (rank 0 shifted up, rank 1 down, so a statistic
rule decides differently per rank) and writes, per scenario and strategy, ``{scenario}-{strategy}-rank{r}.pt``:
the full parameters and buffers (sharded ones gathered), the initial ones, the full masks of GradientMasking,
and what the callbacks counted. ``resume`` trains 4 epochs straight, and 2 + (save, resume) 2, under DDP,
under FSDP2 with a sharded checkpoint (a folder, the default) and with a full-state one (``fsdp2-full``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lit_partial import (
    ActivationDetach,
    ActivationMemoryMonitor,
    ConditionalDetach,
    ConditionalSkip,
    DropBackward,
    GradientMasking,
    LayerFreezing,
    PartialBackpropMixin,
    SelectiveBackprop,
    StochasticDepth,
)
from lit_partial.demos.models import FFNBlock
from lit_partial.distributed import full_tensor
from tests.helpers.acted import RecomputeRecorder

WIDTH = 16


class ShardNet(PartialBackpropMixin, L.LightningModule):
    """``stem`` (Linear 4->16, BatchNorm1d), residual ``blocks.0..2`` (FFNBlock(16)), gate ``features``, ``head``.

    ``configure_model`` applies ``fully_shard`` to the stem, every block, then the root, when the strategy
    provides a device mesh (ModelParallelStrategy); under DDP it does nothing.

    Args:
        lr: AdamW's learning rate.
        norm: Put a BatchNorm1d in the stem (``stem.1``). Its running statistics differ between the strategies
            whenever it trains: DDP broadcasts rank 0's buffers before every forward, FSDP2 never syncs buffers.
    """

    def __init__(self, lr: float = 0.05, norm: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(4, WIDTH), nn.BatchNorm1d(WIDTH) if norm else nn.Identity())
        self.blocks = nn.Sequential(*(FFNBlock(WIDTH) for _ in range(3)))
        self.head = nn.Linear(WIDTH, 2)
        self.lr = lr

    @override
    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in (self.stem, *self.blocks):
            fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.gate("features", self.blocks(self.stem(x))))

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y, reduction="none").mean(1)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_sample_loss(batch).mean()

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        # AdamW with weight decay: momentum, moments and decay all try to move frozen and masked elements.
        return torch.optim.AdamW(self.partial_param_groups(lr=self.lr, weight_decay=0.1))


class RankData(L.LightningDataModule):
    """Different data per rank (rank 0 shifted by +2, rank 1 by -2): 5 batches of 8 per epoch."""

    @override
    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        gen = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(40, 4, generator=gen) + (2.0 if rank == 0 else -2.0)
        return DataLoader(TensorDataset(x, torch.randn(40, 2, generator=gen)), batch_size=8, shuffle=False)


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer as a full CPU tensor (sharded ones gathered: call on every rank)."""
    state = {n: full_tensor(p.detach()).cpu().clone() for n, p in model.named_parameters()}
    state.update({n: full_tensor(b.detach()).cpu().clone() for n, b in model.named_buffers()})
    return state


class Dump(Callback):
    """At the end of fit every rank writes the full state, the initial state and what the callbacks counted."""

    def __init__(self, path: Path, initial: dict[str, Tensor]) -> None:
        self.path, self.initial = path, initial

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out: dict[str, Any] = {"state": full_state(pl_module), "initial": self.initial, "extra": {}}
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            name = type(cb).__name__
            if isinstance(cb, GradientMasking):
                out["masks"] = {n: full_tensor(m).cpu() for n, m in cb.masks.items()}
                out["extra"]["masked_counts"] = {e.name: e.frozen for e in cb._entries}
            if hasattr(cb, "fractions"):
                out["extra"][f"fractions/{name}"] = cb.fractions()
            if isinstance(cb, ActivationMemoryMonitor):
                out["extra"]["saved_bytes"] = list(cb.history)
            if isinstance(cb, RecomputeRecorder):
                out["extra"]["recomputed"] = [sorted(names) for names in cb.per_backward]
            if isinstance(cb, SelectiveBackprop):
                out["extra"]["selected"] = [cb.forward_samples, cb.backward_samples]
            if isinstance(cb, LayerFreezing):
                out["extra"]["trainable"] = sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)
                out["extra"]["param_groups"] = [
                    (g.get("name"), g["lr"])
                    for g in trainer.optimizers[0].param_groups  # type: ignore[attr-defined]
                ]
        torch.save(out, self.path.with_name(self.path.name.replace("RANK", str(trainer.global_rank))))


def stat(value: float = 0.0) -> dict[str, Any]:
    """A statistic condition that holds on rank 0's data and not on rank 1's (their means differ in sign)."""
    return {"stat": "mean", "op": ">", "value": value}


#: name -> (callbacks factory, max_epochs). Each scenario runs under both strategies with the same seed.
SCENARIOS: dict[str, tuple[Callable[[], list[Callback]], int]] = {
    "plain": (lambda: [], 2),
    "plain_norm": (lambda: [], 2),
    "freezing": (
        lambda: [
            LayerFreezing(
                frozen=["stem", "blocks.0", "blocks.1"],
                schedule=[
                    {"epoch": 1, "unfreeze": "blocks.1", "lr_scale": 0.1},
                    {"step": 7, "unfreeze": "blocks.0", "lr_scale": 0.5},
                    {"epoch": 2, "freeze": "blocks.2"},
                ],
            )
        ],
        3,
    ),
    "masking": (
        lambda: [
            GradientMasking(
                {
                    "blocks.0.fc1.weight": {"kind": "random", "keep": 0.3, "seed": 0},
                    "blocks.1": {"kind": "rows", "index": [0, 2, 5]},  # weights and biases, kept in broadcast shape
                    "blocks.2.fc1.weight": {"kind": "columns", "index": [1, 3]},  # (1, cols): replicated shards
                    "head.weight": {"kind": "magnitude", "keep": 0.5},
                    "blocks.2.fc2.weight": {"kind": "where", "op": ">", "value": 0.0},
                    "stem.0.bias": torch.tensor([1.0, 0.0] * (WIDTH // 2)),
                },
                strict=True,
            )
        ],
        2,
    ),
    "detach": (  # rules every rank decides the same way: results equal DDP's
        lambda: [
            ConditionalDetach(
                {
                    "features": {"every_n_steps": 3},  # a gate: every 3rd step only the head learns
                    "blocks.0.fc1": {"probability": 0.5, "seed": 1},
                    "blocks.1.fc1": {"when": {"steps": [0, 3]}, "grad_scale": -0.5},
                    "blocks.1.fc2": {"when": stat(), "per_sample": True},
                    "blocks.2": {"epochs": [0, 1]},
                }
            )
        ],
        2,
    ),
    "skip": (lambda: [StochasticDepth(blocks="blocks.*", drop_rate=0.5, seed=3)], 2),
    "skip_per_sample": (
        lambda: [ConditionalSkip({"blocks.*": {"when": {"probability": 0.5, "seed": 2}, "per_sample": True}})],
        2,
    ),
    "activations": (  # the recorder shows the checkpointing acting: backward runs the blocks' layers again
        lambda: [
            ActivationDetach(at={"stem": {"steps": [0, 4]}}, checkpoint=["blocks.1", "blocks.2"]),
            RecomputeRecorder(),
        ],
        2,
    ),
    "selective": (lambda: [SelectiveBackprop(keep=0.5, method="probability", seed=1)], 2),
    "drop_backward": (lambda: [DropBackward("blocks.*.fc2", rate=0.5, seed=2)], 2),  # branches x + fc2(relu(fc1 x))
    "monitor": (lambda: [ActivationMemoryMonitor()], 1),
    "per_rank_statistic": (  # decided differently per rank under DDP; once for all ranks under FSDP2
        lambda: [
            # The stem's output has a positive mean on rank 0 half of the time, on rank 1 always (measured).
            ConditionalDetach({"stem": stat(), "features": {"any": [stat(0.5), {"steps": [8, 9]}]}}),
            ConditionalSkip({"blocks.0": {"all": [stat(), {"probability": 0.7, "seed": 4}]}}),
            ActivationDetach(at={"stem.0": stat()}),
        ],
        2,
    ),
}
#: Scenarios whose model has a BatchNorm in the stem (frozen there, so it keeps its statistics).
WITH_NORM = {"plain_norm", "freezing"}

RESUME_CALLBACKS: Callable[[], list[Callback]] = lambda: [  # noqa: E731
    LayerFreezing(
        frozen=["blocks.0", "blocks.1"],
        schedule=[
            {"epoch": 1, "unfreeze": "blocks.1", "lr_scale": 0.1},
            {"epoch": 3, "unfreeze": "blocks.0", "lr_scale": 0.5},
        ],
    ),
    GradientMasking(
        {
            "blocks.1.fc1.weight": {"kind": "random", "keep": 0.3, "seed": 0},
            "head.weight": {"kind": "magnitude", "keep": 0.5},
            "blocks.2.fc2.weight": {"kind": "where", "op": ">", "value": 0.0},
        }
    ),
    StochasticDepth(blocks="blocks.*", drop_rate=0.3, seed=1),
    SelectiveBackprop(keep=0.5, method="probability", seed=1),
]


def make_strategy(name: str) -> Any:
    """``"fsdp2"``: ModelParallelStrategy, data parallel over 2 processes (``"fsdp2-full"``: saving full-state
    checkpoint files instead of sharded folders); ``"ddp"``: plain DDP."""
    if name.startswith("fsdp2"):
        full = name == "fsdp2-full"
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not full)
    return name


def fit(
    strategy: str,
    callbacks: list[Callback],
    max_epochs: int,
    dump: Path | None,
    ckpt_path: Path | None = None,
    norm: bool = False,
) -> L.Trainer:
    """Train a fresh ShardNet (seed 0) on 2 processes; return the trainer."""
    torch.manual_seed(0)
    model = ShardNet(norm=norm)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    extra = [Dump(dump, initial)] if dump is not None else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=make_strategy(strategy),
        max_epochs=max_epochs,
        callbacks=[*callbacks, *extra],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=RankData(), ckpt_path=ckpt_path)
    return trainer


def main(out: Path, only: list[str] | None, strategies: list[str]) -> None:
    """Run the scenarios (and the resume check) under each strategy; see the module docstring."""
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in [*SCENARIOS, "resume"] if only is None or n in only]
    for name in names:
        for strategy in [*strategies, "fsdp2-full"] if name == "resume" and "fsdp2" in strategies else strategies:
            start = time.perf_counter()
            if name == "resume":
                fit(strategy, RESUME_CALLBACKS(), 4, out / f"resume-{strategy}-straight-rankRANK.pt")
                part = fit(strategy, RESUME_CALLBACKS(), 2, None)
                ckpt = out / f"resume-{strategy}-epoch2.ckpt"
                part.save_checkpoint(ckpt)  # every rank: under FSDP2 each writes its shards (a folder)
                fit(strategy, RESUME_CALLBACKS(), 4, out / f"resume-{strategy}-resumed-rankRANK.pt", ckpt_path=ckpt)
            else:
                factory, epochs = SCENARIOS[name]
                fit(strategy, factory(), epochs, out / f"{name}-{strategy}-rankRANK.pt", norm=name in WITH_NORM)
            if torch.distributed.get_rank() == 0:
                print(f"scenario {name} under {strategy}: {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", default=None, help="comma-separated scenario names (default: all, and resume)")
    parser.add_argument("--strategies", default="fsdp2,ddp")
    args = parser.parse_args()
    main(args.out, args.only.split(",") if args.only else None, args.strategies.split(","))
