"""Proof that a technique acted, for identity tests (a run with it equals a run without it, bit for bit).

An identity test passes just as well when the technique does nothing. So each one also measures, inside the
runs it already makes, that the technique acted. For activation checkpointing that means recomputation:
backward runs the checkpointed modules' children again, and a plain backward runs no module at all.
:func:`modules_called` records those calls around a hand-written ``backward()``; :class:`RecomputeRecorder`
records them during every backward of a Lightning fit. Saved bytes are measured with the library's own
:class:`~lit_partial.functional.SavedTensorTracker` or :class:`~lit_partial.ActivationMemoryMonitor`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override


@contextlib.contextmanager
def modules_called(model: nn.Module) -> Iterator[set[str]]:
    """The names of ``model``'s submodules called (``module(...)``) while inside the block.

    Modules outside ``model`` (e.g. the pieces a segmented checkpoint builds) are not recorded.
    """
    names = {id(m): name for name, m in model.named_modules()}
    called: set[str] = set()

    def hook(module: nn.Module, args: Any) -> None:
        name = names.get(id(module))
        if name is not None:
            called.add(name)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield called
    finally:
        handle.remove()


class RecomputeRecorder(Callback):
    """For each backward of training, the names of the submodules that ran during it (:attr:`per_backward`).

    Plain backward calls no module, so without checkpointing every entry is empty; with it, each entry holds
    the children of the checkpointed modules that backward reached (see :func:`inner_modules`).
    """

    def __init__(self) -> None:
        self.per_backward: list[set[str]] = []
        self._context: contextlib.AbstractContextManager[set[str]] | None = None

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._context = modules_called(pl_module)
        self.per_backward.append(self._context.__enter__())

    @override
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()  # a backward that raised leaves the global hook installed until here

    def _close(self) -> None:
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(None, None, None)


def inner_modules(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The proper descendants of the named modules: what recomputing them calls (a leaf module calls none)."""
    return {f"{name}.{sub}" for name in names for sub, _ in model.get_submodule(name).named_modules() if sub}


def below(names: Iterable[str], parents: Iterable[str]) -> set[str]:
    """The names strictly below one of ``parents`` (``"a.b.c"`` is below ``"a.b"``, ``"a.bc"`` is not)."""
    prefixes = tuple(f"{p}." for p in parents)
    return {n for n in names if n.startswith(prefixes)}
