"""Keeping what DDP does not know in sync, for :class:`~lit_partial.LayerFreezing`; and FSDP2 optimizer state.

Under DDP a registered parameter that stops getting gradients breaks DDP's next step (without the costly
``find_unused_parameters``), so parameters the schedule freezes later are kept out of DDP
(:meth:`UnsyncedParams.exclude`), broadcast once at fit start and, while trainable, their gradients all-reduced
before each optimizer step in one coalesced collective (:meth:`UnsyncedParams.reduce`). Parameters unfrozen
after DDP wrapped the model are reduced the same way.

Under FSDP2 (``ModelParallelStrategy``) the strategy restores optimizer state before callbacks restore theirs:
:func:`reload_sharded_optimizer_state` reads the entries of parameters unfrozen before the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_partial._compat import ddp_ignored_names, set_ddp_ignored_names
from lit_partial.distributed import (
    all_reduce_gradients,
    broadcast_parameters,
    is_sharded,
    load_missing_optimizer_state,
    strategy_family,
    world_size,
)
from lit_partial.errors import ConfigurationError
from lit_partial.handles import Handle, Handles
from lit_partial.module import attached_trainer

__all__ = ["UnsyncedParams", "reload_sharded_optimizer_state"]


class UnsyncedParams:
    """Trainable parameters DDP does not reduce, and their gradient all-reduce (a no-op outside DDP)."""

    def __init__(self) -> None:
        self._ddp_known: set[int] | None = None  # ids of parameters DDP reduces; None when not under DDP
        self._unsynced: dict[int, list[nn.Parameter]] = {}  # optimizer id -> trainable params DDP does not reduce

    def exclude(self, trainer: L.Trainer, pl_module: nn.Module, later: Sequence[str], handles: Handles) -> None:
        """Keep ``later`` (names of parameters frozen later) out of DDP; the undo goes into ``handles``.

        Raises:
            ConfigurationError: If nothing trainable at the start would be left for DDP to reduce.
        """
        if strategy_family(trainer) != "ddp":  # DDP wraps even a single process
            return
        existing = ddp_ignored_names(pl_module)
        added = [n for n in dict.fromkeys(later) if n not in existing]
        if not added:
            return
        ignored = set(existing) | set(later)
        if not any(p.requires_grad for n, p in pl_module.named_parameters() if n not in ignored):
            raise ConfigurationError(
                "LayerFreezing under DDP: every parameter trainable at the start is frozen later by the schedule, "
                "so DDP would wrap a model with nothing to reduce. Fix: keep at least one module (e.g. the head) "
                "trainable for the whole run."
            )
        set_ddp_ignored_names(pl_module, existing + added)
        handles.add(Handle(lambda: set_ddp_ignored_names(pl_module, existing)))

    def start(self, trainer: L.Trainer, pl_module: nn.Module) -> None:
        """At fit start: record what DDP reduces, and broadcast the excluded parameters from rank 0."""
        if strategy_family(trainer) != "ddp":
            self._ddp_known = None
            return
        ignored = set(ddp_ignored_names(pl_module))
        self._ddp_known = {id(p) for n, p in pl_module.named_parameters() if p.requires_grad and n not in ignored}
        self._unsynced.clear()
        # DDP broadcasts only what it does not ignore; our excluded parameters start identical too.
        broadcast_parameters([p for n, p in pl_module.named_parameters() if n in ignored])

    def changed(self) -> None:
        """What is trainable changed: the lists of parameters to reduce are built again at the next step."""
        self._unsynced.clear()

    def reset(self) -> None:
        """Forget everything (teardown)."""
        self._ddp_known = None
        self._unsynced.clear()

    def reduce(self, optimizer: torch.optim.Optimizer) -> None:
        """Average the gradients of ``optimizer``'s trainable parameters DDP does not reduce (before its step)."""
        if self._ddp_known is None or world_size() < 2:
            return
        # Built once per schedule change, not every step. Same optimizer order on every rank, so every rank
        # passes the same list to the one collective.
        params = self._unsynced.get(id(optimizer))
        if params is None:
            known = self._ddp_known
            wanted = (p for g in optimizer.param_groups for p in g["params"] if p.requires_grad and id(p) not in known)
            params = self._unsynced[id(optimizer)] = list(dict.fromkeys(wanted))
        all_reduce_gradients(params)


def reload_sharded_optimizer_state(model: nn.Module) -> None:
    """Under FSDP2, load the saved optimizer state of parameters trainable again (see the module docstring)."""
    # ModelParallelStrategy loads the optimizer state before this callback's state, into a template made while
    # the parameters frozen in `setup` do not require gradients: the saved moments of parameters unfrozen before
    # the checkpoint are skipped. Read them now that those parameters train again.
    trainer = attached_trainer(model)
    if trainer is None or not is_sharded(trainer):
        return
    loaded = load_missing_optimizer_state(model, trainer.optimizers, trainer.ckpt_path)
    if loaded:
        rank_zero_info(
            f"LayerFreezing: loaded the checkpoint's optimizer state of {len(loaded)} parameters frozen at fit "
            "start (the strategy restores optimizer state before callbacks, so it skipped them)."
        )
