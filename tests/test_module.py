from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_partial.attach import batch_transforms, watch_gates
from lit_partial.module import PartialBackpropMixin, register_batch_transform, register_gate
from lit_partial.summary import record_masked, summarize
from tests.helpers import quiet_trainer


class Base(L.LightningModule):
    """A user's own base class with an __init__ argument and its own hook."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.seen_in_hook: list[torch.Tensor] = []


class Net(PartialBackpropMixin, Base):
    def __init__(self, width: int = 4) -> None:
        super().__init__(width)
        self.backbone = nn.Linear(width, width)
        self.head = nn.Linear(width, 1)
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate("features", self.backbone(x)))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # the user's hook calls super()
        self.seen_in_hook.append(batch[0])
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.batches.append(batch[0])
        return self(batch[0]).pow(2).mean()

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, self.width)), batch_size=2)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.partial_param_groups(lr=0.1, momentum=0.9), lr=0.1)


def test_mixin_cooperates_with_super_init_chain() -> None:
    net = Net(width=3)
    assert net.width == 3 and isinstance(net, L.LightningModule)
    assert not any(key.startswith("_lit_partial") for key in net.state_dict())


def test_gate_is_identity_without_rules_and_leaves_the_module_untouched() -> None:
    net = Net()
    before = dict(net.__dict__)
    x = torch.randn(2, 4)
    assert net.gate("anything", x) is x
    assert net.__dict__ == before  # running a gate attaches nothing


def test_gate_watchers_record_gates_that_ran_until_removed() -> None:
    net = Net()
    seen: set[str] = set()
    handle = watch_gates(net, seen)
    net.gate("anything", torch.zeros(1))
    handle.remove()
    net.gate("later", torch.zeros(1))
    assert seen == {"anything"}


def test_register_gate_applies_and_removes_in_order() -> None:
    net = Net()
    h1 = register_gate(net, "features", lambda t: t * 2)
    h2 = register_gate(net, "features", lambda t: t + 1)
    x = torch.ones(1)
    assert net.gate("features", x).item() == 3.0  # (1 * 2) + 1: registration order
    assert net.gate("other", x) is x
    h1.remove()
    assert net.gate("features", x).item() == 2.0
    h2.remove()
    assert net.gate("features", x) is x
    assert not any(key.startswith("_lit_partial") for key in net.__dict__)  # nothing left once all are removed


def test_gate_detach_cuts_backbone_gradient() -> None:
    net = Net()
    handle = register_gate(net, "features", lambda t: t.detach())
    net(torch.randn(3, 4)).sum().backward()
    assert net.backbone.weight.grad is None and net.head.weight.grad is not None
    handle.remove()


def test_per_sample_loss_names_who_needs_it() -> None:
    with pytest.raises(
        NotImplementedError, match=r"Net\.per_sample_loss\(batch\) is not implemented; SelectiveBackprop"
    ):
        Net().per_sample_loss((torch.zeros(1, 4),))


def test_default_param_groups_hold_every_parameter_by_identity() -> None:
    net = Net()
    with torch.no_grad():  # equal values must not merge parameters (compared by identity)
        for p in net.parameters():
            p.fill_(1.0)
    [group] = net.partial_param_groups(lr=0.5)
    assert group["lr"] == 0.5 and group["name"] == "all"
    assert [id(p) for p in group["params"]] == [id(p) for p in net.parameters()]


class Planner(Callback):
    def plan_param_groups(self, model: nn.Module, defaults: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"params": list(model.backbone.parameters()), "name": "backbone", **defaults, "lr": defaults["lr"] / 10},
            {"params": list(model.head.parameters()), "name": "head", **defaults},
        ]


def test_param_groups_come_from_the_planning_callback() -> None:
    net = Net()
    trainer = quiet_trainer(max_steps=1, callbacks=[Planner()])
    trainer.fit(net)
    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1])
    assert groups[0]["momentum"] == 0.9


def test_two_planners_are_an_error() -> None:
    trainer = quiet_trainer(max_steps=1, callbacks=[Planner(), Planner()])
    with pytest.raises(ValueError, match=r"several callbacks plan parameter groups \(Planner, Planner\)"):
        trainer.fit(Net())


def test_batch_transform_runs_before_training_step_and_user_hook() -> None:
    net = Net()
    handle = register_batch_transform(net, lambda batch, idx: [batch[0] * 3])
    quiet_trainer(max_steps=2).fit(net)
    assert all(torch.equal(b, torch.full((2, 4), 3.0)) for b in net.batches)
    assert all(torch.equal(b, torch.full((2, 4), 3.0)) for b in net.seen_in_hook)
    handle.remove()
    assert not batch_transforms(net)


def test_batch_transform_needs_the_mixin() -> None:
    with pytest.raises(TypeError, match=r"declare `class Linear\(PartialBackpropMixin, L.LightningModule\)`"):
        register_batch_transform(nn.Linear(1, 1), lambda b, i: b)


def test_summary_counts_trainable_and_masked() -> None:
    net = Net()
    net.backbone.weight.requires_grad_(False)
    record_masked(net, {"head.weight": 3})
    rows = {r.name: r for r in summarize(net)}
    assert (rows["backbone"].total, rows["backbone"].trainable, rows["backbone"].masked) == (20, 4, 0)
    assert (rows["head"].total, rows["head"].trainable, rows["head"].masked) == (5, 5, 3)
    assert (rows["total"].total, rows["total"].trainable, rows["total"].masked) == (25, 9, 3)
    table = net.partial_summary()
    assert table.splitlines()[0].split() == ["module", "params", "trainable", "masked", "trainable", "%"]
    assert "backbone" in table and "20.0" in table  # 4 of 20 trainable
