"""CostMonitor against hand-computed counts: FLOPs of a linear layer, the bytes it saves, masked elements, state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lit_partial import CostMonitor, GradientMasking, PartialBackpropMixin
from lit_partial.errors import ConfigurationError
from lit_partial.functional.activations import saved_activation_bytes
from tests.helpers import quiet_trainer

B, IN, OUT = 2, 4, 3


class LinearSum(PartialBackpropMixin, L.LightningModule):
    """``Linear(4, 3, bias=False)`` whose loss is the sum of its outputs (no FLOPs beyond the matrix product)."""

    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__()
        self.layer = nn.Linear(IN, OUT, bias=False)
        self.optimizer = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.layer(batch[0]).sum()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(steps: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(steps * B, IN)), batch_size=B)


def fit(monitor: CostMonitor, model: LinearSum | None = None, callbacks: tuple[Any, ...] = ()) -> LinearSum:
    model = model or LinearSum()
    quiet_trainer(max_steps=4, callbacks=[*callbacks, monitor]).fit(model, loader())
    return model


def test_flops_and_saved_bytes_are_the_hand_computed_ones_on_every_measured_step() -> None:
    monitor = CostMonitor(every_n_steps=2)
    model = fit(monitor)
    # forward: 2*B*IN*OUT multiply-adds; backward: the weight gradient only (the input needs none), as many again
    assert monitor.forward_flops == monitor.backward_flops == [2 * B * IN * OUT] * 2  # steps 0 and 2 measured
    # what backward keeps: the layer's input (B x IN float32); the weight is a parameter, not an activation
    x = torch.randn(B, IN)
    reference = saved_activation_bytes(lambda: model.layer(x).sum(), exclude=model)
    assert monitor.saved_bytes == [reference] * 2 and reference == B * IN * 4
    assert len(monitor.step_seconds) == 2  # steps 1 and 3 timed, the measured ones left out
    summary = monitor.summary()
    assert (summary["steps"], summary["forward_flops"], summary["saved_activation_bytes"]) == (4, 48.0, 32.0)


def test_trainable_elements_leave_out_masked_elements() -> None:
    monitor = CostMonitor(every_n_steps=2)
    fit(monitor)
    assert monitor.trainable == [OUT * IN] * 4
    mask = torch.ones(OUT, IN)
    mask[0, :3] = 0  # 3 elements held fixed
    monitor = CostMonitor(every_n_steps=2)
    fit(monitor, callbacks=(GradientMasking({"layer.weight": mask}),))
    assert monitor.trainable == [OUT * IN - 3] * 4


@pytest.mark.parametrize(
    ("optimizer", "expected"),
    [
        ("sgd", OUT * IN * 4),  # the momentum buffer
        ("adam", 2 * OUT * IN * 4 + 4),  # exp_avg and exp_avg_sq, and the float32 step counter
    ],
)
def test_optimizer_state_bytes_are_the_moments_the_optimizer_keeps(optimizer: str, expected: int) -> None:
    monitor = CostMonitor(every_n_steps=2)
    fit(monitor, model=LinearSum(optimizer))
    assert monitor.summary()["optimizer_state_bytes"] == expected


class ScaledLinearSum(LinearSum):
    """LinearSum times a trainable scalar, so something still trains when the layer is frozen."""

    def __init__(self) -> None:
        super().__init__("adam")
        self.scale = nn.Parameter(torch.ones(()))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.layer(batch[0]).sum() * self.scale


class FreezeAfterStep(L.Callback):
    """Freeze the layer and drop its optimizer state from ``step`` on (what AdaptiveFreezing does to a layer)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.step:
            pl_module.layer.weight.requires_grad_(False)
            pl_module.layer.weight.grad = None
            trainer.optimizers[0].state.pop(pl_module.layer.weight)


def test_optimizer_state_is_the_largest_read_when_a_technique_drops_state_during_the_run() -> None:
    monitor = CostMonitor(every_n_steps=2)
    fit(monitor, model=ScaledLinearSum(), callbacks=(FreezeAfterStep(2),))  # the weight's Adam state: steps 0, 1
    summary = monitor.summary()
    scale = 3 * 4  # the scalar's exp_avg, exp_avg_sq and step
    assert summary["optimizer_state_bytes"] == 2 * OUT * IN * 4 + 4 + scale  # read after step 0, a measured one
    assert summary["final_optimizer_state_bytes"] == scale
    assert monitor.trainable == [OUT * IN + 1] * 2 + [1] * 2


def test_the_summary_is_written_with_the_name_and_the_final_metrics(tmp_path: Path) -> None:
    monitor = CostMonitor(every_n_steps=2, path=tmp_path / "costs.json", name="plain")
    fit(monitor)
    record = json.loads((tmp_path / "costs.json").read_text())
    assert record == {
        **monitor.summary(),
        "name": "plain",
        "train_loss": pytest.approx(record["train_loss"]),
        "world_size": 1,
    }
    assert "val_acc" not in record  # nothing invented: only what the run logged


@pytest.mark.parametrize("value", [1, 0, 2.0, True, "2"])
def test_every_n_steps_must_be_an_int_of_at_least_two(value: Any) -> None:
    with pytest.raises(ConfigurationError, match=r"`every_n_steps` must be an int >= 2 .*got .*; e.g. every_n_steps=2"):
        CostMonitor(every_n_steps=value)


class TwoLayers(PartialBackpropMixin, L.LightningModule):
    """Linear-Tanh-Linear whose loss is the sum of its outputs; nothing logged (logging keeps tensors alive)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, 8), nn.Tanh(), nn.Linear(8, OUT))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.net(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_live_forward_bytes_see_what_selective_checkpointing_caches() -> None:
    from lit_partial import ActivationDetach
    from lit_partial.functional.activation_cuts import checkpoint_modules
    from lit_partial.functional.selective_checkpoint import live_forward_bytes

    monitor = CostMonitor(every_n_steps=2)
    model = TwoLayers()
    quiet_trainer(max_steps=4, callbacks=[ActivationDetach(checkpoint="net", policy="matmul"), monitor]).fit(
        model, loader()
    )
    x = torch.randn(B, IN)
    handles = checkpoint_modules(model, "net", policy="matmul")
    reference = live_forward_bytes(lambda: model.net(x).sum(), exclude=[model, x])
    handles.remove()
    # the cached outputs of both matrix products (B x 8 and B x OUT floats) and the loss; the hooks see only the input.
    # Under the Trainer one float more: Lightning's loss / accumulate_grad_batches.
    assert reference == (B * 8 + B * OUT + 1) * 4 and monitor.live_bytes == [reference + 4] * 2
    assert monitor.saved_bytes == [B * IN * 4] * 2
    assert monitor.summary()["live_forward_bytes"] == reference + 4


def test_a_compiled_model_is_warned_about_running_uncompiled() -> None:
    model = LinearSum()
    model.compile(backend="eager")
    with pytest.warns(UserWarning, match=r"CostMonitor: '' of LinearSum is compiled.*uncompiled for the whole run"):
        fit(CostMonitor(), model)
