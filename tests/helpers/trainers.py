"""A quiet CPU trainer, recorded gradients, per-rank parameter dumps and a bitwise state comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def quiet_trainer(**kwargs: Any) -> L.Trainer:
    """A CPU trainer without logger, checkpoints, progress bar or model summary (override any of them)."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class RecordGrads(Callback):
    """Per optimizer step: which parameters got no gradient, and a copy of every gradient."""

    def __init__(self) -> None:
        self.no_grad: list[set[str]] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        params = dict(pl_module.named_parameters())
        self.no_grad.append({n for n, p in params.items() if p.grad is None})
        self.grads.append({n: p.grad.clone() for n, p in params.items() if p.grad is not None})


class SaveParamsPerRank(Callback):
    """At the end of fit, every rank writes ``{name: tensor}`` of all parameters and buffers to ``dir/rank{r}.pt``.

    Use it with ``strategy="ddp_spawn"`` to compare replicas after training (see :func:`load_rank_states`).
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def load_rank_states(directory: str | Path, world_size: int = 2) -> list[dict[str, torch.Tensor]]:
    """Load what :class:`SaveParamsPerRank` wrote."""
    return [torch.load(Path(directory) / f"rank{r}.pt") for r in range(world_size)]


def assert_states_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Fail naming the first differing entry and its max abs difference."""
    assert a.keys() == b.keys(), f"different keys: {set(a) ^ set(b)}"
    for key in a:
        if not torch.equal(a[key], b[key]):
            diff = (a[key].double() - b[key].double()).abs().max().item()
            raise AssertionError(f"{key} differs: max |a - b| = {diff:.3e}")
