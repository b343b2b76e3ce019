"""Exact resume for the main job: the global RNG states travel in the checkpoint.

Lightning checkpoints hold the model, optimizers, schedulers, loops, callbacks and (with a stateful loader such
as :class:`~lit_partial.demos.digits.ResumableDataLoader`) the position in the epoch, but not the global RNG
states that dropout and other random ops draw from. ``RngState`` saves torch's, numpy's and Python's (as plain
tensors, lists and tuples: ``weights_only=True`` loading keeps working) and restores them at ``on_train_start``,
just before the first resumed batch. Nothing between the restore and that batch draws from them (the data order
uses its own generator), so a resumed run draws exactly what the uninterrupted one drew.

Example:
    >>> cb = RngState()
    >>> state = cb.state_dict()
    >>> a = torch.rand(2)
    >>> cb.load_state_dict(state); cb.restore()
    >>> torch.equal(torch.rand(2), a)
    True
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["RngState"]


class RngState(Callback):
    """Save the global RNG states in checkpoints and restore them when a resumed run starts training."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "numpy": {
                "kind": str(kind),
                "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
            "python": random.getstate(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def restore(self) -> None:
        """Set the loaded states as the global ones (once)."""
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        np_state = state["numpy"]
        keys = np_state["keys"].numpy().astype(np.uint32)
        np.random.set_state(
            (np_state["kind"], keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"])
        )
        random.setstate(state["python"])

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.restore()
