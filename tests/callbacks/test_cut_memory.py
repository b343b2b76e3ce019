"""A cut frees what the layers below it saved, however it is made and however it is measured (issue #24).

``ActivationDetach(at=)``, ``ConditionalDetach`` and ``detach_outputs`` must hold exactly the bytes a ``.detach()``
written in ``forward`` holds, under ``ActivationMemoryMonitor`` and under ``CostMonitor`` (whose FLOP counter once
kept the graph below a cut alive). The lifetime check does not use the saved-tensor tracker at all: a sentinel
autograd node below the cut must be gone when backward starts.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lit_partial import ActivationDetach, ActivationMemoryMonitor, ConditionalDetach, CostMonitor
from lit_partial.functional import detach_outputs
from tests.helpers import quiet_trainer
from tests.helpers.activation_models import UNIT, B, FFNModule, N, W, ffn_loader
from tests.helpers.compile import BACKEND, dynamo_counts

pytestmark = pytest.mark.filterwarnings("ignore:.*validation_step.*")

CUT = "net.blocks.1"
HAND_BYTES = (2 * (N - 2) + 1) * UNIT  # blocks 2, 3 keep input and ReLU output; the loss's pow keeps (out - y)


class _Token:
    """Something weakref-able that a sentinel node holds for as long as the node lives."""


class _Sentinel(torch.autograd.Function):
    """Identity whose backward node holds a :class:`_Token`: the node's lifetime, seen without saved-tensor hooks."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, token: _Token) -> Tensor:
        ctx.token = token
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _GraphBelowCut(Callback):
    """Puts a sentinel on the output of ``net.blocks.0`` (below the cut); records whether it lives at backward."""

    def __init__(self) -> None:
        self.alive: list[bool] = []
        self._ref: Callable[[], _Token | None] = lambda: None

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def hook(module: nn.Module, args: Any, output: Tensor) -> Tensor:
            if not pl_module.training:
                return output
            token = _Token()
            self._ref = weakref.ref(token)
            return _Sentinel.apply(output, token)  # type: ignore[no-any-return]

        self._handle = pl_module.net.blocks[0].register_forward_hook(hook)

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.alive.append(self._ref() is not None)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handle.remove()


def _cut(how: str, compiled: bool = False) -> tuple[FFNModule, list[Callback]]:
    if how == "hand":
        return FFNModule(hand_detach=1), []
    model = FFNModule()
    if compiled:  # the blocks and the hooks on them run inside one compiled region
        model.net.compile(backend=BACKEND)
    if how == "ActivationDetach":
        return model, [ActivationDetach(at=CUT)]
    if how == "ConditionalDetach":
        return model, [ConditionalDetach({CUT: "always"}, log=False)]
    detach_outputs(model, CUT)  # lives as long as the model
    return model, []


def _measure(how: str, compiled: bool = False) -> tuple[CostMonitor, ActivationMemoryMonitor, _GraphBelowCut]:
    model, callbacks = _cut(how, compiled)
    cost, monitor, sentinel = CostMonitor(every_n_steps=2), ActivationMemoryMonitor(), _GraphBelowCut()
    quiet_trainer(max_steps=4, callbacks=[*callbacks, sentinel, monitor, cost], limit_val_batches=0).fit(
        model, ffn_loader()
    )
    return cost, monitor, sentinel


@pytest.mark.parametrize("how", ["hand", "ActivationDetach", "ConditionalDetach", "detach_outputs"])
def test_a_cut_frees_the_activations_below_it_on_measured_steps_too(how: str) -> None:
    cost, monitor, sentinel = _measure(how)
    assert cost.saved_bytes == [HAND_BYTES] * 2  # steps 0 and 2: the FLOP counter runs, the graph is still freed
    assert list(monitor.history) == [HAND_BYTES] * 4
    assert sentinel.alive == [False] * 4  # the node below the cut is gone when backward starts
    # backward runs through blocks 2 and 3 only, (B, W) x (W, W) products of 2 * B * W * W FLOPs: a weight gradient
    # for each of their 4 Linears, an input gradient for 3 of them (block 2's fc1 has a detached input)
    assert cost.backward_flops == [(4 + 3) * 2 * B * W * W] * 2


@pytest.mark.parametrize("how", ["ActivationDetach", "ConditionalDetach", "detach_outputs"])
def test_a_cut_in_a_compiled_model_holds_the_bytes_of_the_hand_written_detach(how: str) -> None:
    # No CostMonitor here: a model first called under its FlopCounterMode (a dispatch mode) is never compiled.
    model, callbacks = _cut(how, compiled=True)
    monitor = ActivationMemoryMonitor()
    with dynamo_counts() as counts:
        quiet_trainer(max_steps=4, callbacks=[*callbacks, monitor], limit_val_batches=0).fit(model, ffn_loader())
    assert (counts.graphs, counts.breaks) == (1, 0)
    assert list(monitor.history) == [HAND_BYTES] * 4


def test_without_a_cut_the_sentinel_lives_until_backward() -> None:
    """The sentinel check can fail: without a cut the node below is needed by backward and alive."""
    cost, sentinel = CostMonitor(every_n_steps=2), _GraphBelowCut()
    quiet_trainer(max_steps=2, callbacks=[sentinel, cost], limit_val_batches=0).fit(FFNModule(), ffn_loader())
    assert sentinel.alive == [True, True]
    assert cost.saved_bytes == [(2 * N + 1) * UNIT]  # every block's input and ReLU output (the clone saves nothing)
