from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_partial import LayerFreezing, PartialBackpropMixin
from lit_partial.distributed import UnsupportedStrategyError
from lit_partial.selectors import SelectorError
from tests.helpers import SaveParamsPerRank, assert_states_bitwise_equal, load_rank_states, quiet_trainer

STEPS_PER_EPOCH = 2


class Net(PartialBackpropMixin, L.LightningModule):
    """backbone = Linear-BN-ReLU-Linear, head = Linear; MSE on a fixed regression target."""

    def __init__(self, opt: str = "sgd", groups: bool = False, sched: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)
        self.opt, self.groups, self.sched = opt, groups, sched

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        params = (
            self.partial_param_groups(lr=0.05) if self.groups else [{"params": list(self.parameters()), "lr": 0.05}]
        )
        opt = make_optimizer(self.opt, params)
        if self.sched == "lambda":
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)]
        if self.sched == "onecycle":
            max_lr = [g["lr"] for g in opt.param_groups]
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=max_lr, total_steps=6 * STEPS_PER_EPOCH)
            return [opt], [{"scheduler": sched, "interval": "step"}]
        if self.sched == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss"}}
        return opt


def make_optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params)
    return torch.optim.AdamW(params, weight_decay=0.5)


def data(n: int = 2 * STEPS_PER_EPOCH * 2, seed: int = 1, batch_size: int | None = None) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randn(n, 2, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or n // STEPS_PER_EPOCH)


def fit(cb: LayerFreezing | None, model: Net | None = None, **kw: Any) -> Net:
    model = model or Net()
    kw.setdefault("max_epochs", 3)
    quiet_trainer(callbacks=[cb] if cb else [], **kw).fit(model, data())
    return model


def reference_loop(opt: str, epochs: int, events: dict[int, tuple[str, str]], frozen: str | None = "backbone") -> Net:
    """Plain PyTorch: requires_grad flips at the given global steps, BN of frozen modules in eval mode."""
    model = Net()
    optimizer = make_optimizer(opt, [{"params": list(model.parameters()), "lr": 0.05}])

    def set_frozen(name: str, flag: bool) -> None:
        module = model.get_submodule(name)
        for p in module.parameters():
            p.requires_grad_(not flag)
            if flag:
                p.grad = None

    if frozen:
        set_frozen(frozen, True)
    step = 0
    for _ in range(epochs):
        for x, y in data():
            if step in events:
                op, name = events[step]
                set_frozen(name, op == "freeze")
            model.train()
            model.backbone[1].train(model.backbone[1].weight.requires_grad)
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
            step += 1
    return model


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": [{"epoch": 1, "step": 2, "unfreeze": "a"}]}, "both"),
        ({"schedule": [{"unfreeze": "a"}]}, "neither of"),
        ({"schedule": [{"epoch": -1, "unfreeze": "a"}]}, "non-negative"),
        ({"schedule": [{"epoch": 1.5, "unfreeze": "a"}]}, r"1\.5; expected a non-negative integer"),
        ({"schedule": [{"step": True, "unfreeze": "a"}]}, "True; expected a non-negative integer"),
        ({"schedule": ["backbone"]}, "must be a dict"),
        ({"schedule": {"epoch": 1}}, "expected a list of dicts"),
        ({"schedule": [{"epoch": 1, "unfreez": "a"}]}, "unknown keys"),
        ({"schedule": [{"epoch": 1}]}, "neither unfreezes nor freezes"),
        ({"schedule": [{"epoch": 1, "unfreeze": "a", "lr_scale": 0}]}, "positive number"),
        ({"schedule": [{"epoch": 1, "freeze": "a", "lr_scale": 0.1}]}, "unfreezes nothing"),
        ({"schedule": [{"epoch": 2, "unfreeze": "a"}, {"epoch": 1, "unfreeze": "b"}]}, "out of order"),
        ({"schedule": [{"epoch": 1, "unfreeze": []}]}, "empty list"),
        ({"frozen": 3}, "must be a string or a list"),
        ({"frozen": "a", "train_bn": "yes"}, "expected True or False"),
        ({}, "neither `frozen` nor `schedule`"),
    ],
)
def test_invalid_arguments_fail_in_init(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerFreezing(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": "b"}, "expected a list of block selectors"),
        ({"blocks": ["b"], "every_n_epochs": 0}, "positive integer"),
        ({"blocks": ["b"], "lr_decay": 0.5}, ">= 1"),
    ],
)
def test_gradual_unfreezing_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerFreezing.gradual_unfreezing(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": [], "total": 10}, "expected a list of block selectors"),
        ({"blocks": ["a", "b"], "total": 0}, "positive number"),
        ({"blocks": ["a", "b"], "total": 10, "t0": 2.0}, r"in \[0, 1\]"),
        ({"blocks": ["a", "b"], "total": 10, "unit": "batch"}, "'step' or 'epoch'"),
    ],
)
def test_progressive_freezing_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LayerFreezing.progressive_freezing(**kwargs)


def test_recipes_build_ulmfit_and_freezeout_schedules() -> None:
    cb = LayerFreezing.gradual_unfreezing(["b.0", "b.1", "b.2"], every_n_epochs=2, lr_decay=2.0)
    assert cb.frozen == ["b.0", "b.1", "b.2"]
    assert [(e.point, e.unfreeze, e.lr_scale) for e in cb.schedule] == [
        (2, ("b.2",), 0.5),
        (4, ("b.1",), 0.25),
        (6, ("b.0",), 0.125),
    ]
    cb = LayerFreezing.progressive_freezing(["b.0", "b.1", "b.2", "b.3"], total=90, t0=0.4)
    assert [(e.kind, e.point, e.freeze) for e in cb.schedule] == [
        ("step", 36, ("b.0",)),
        ("step", 54, ("b.1",)),
        ("step", 72, ("b.2",)),
    ]


def test_unknown_selector_fails_before_the_first_step_with_close_names() -> None:
    cb = LayerFreezing(frozen="backbone", schedule=[{"epoch": 1, "unfreeze": "backbone.9"}])
    model = Net()
    with pytest.raises(SelectorError, match=r"backbone.9.*did you mean"):
        fit(cb, model)
    assert model.global_step == 0


def test_unsupported_strategy_fails_in_setup() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    # DeepSpeed is not installed here, so build the strategy object without its __init__ (only its class matters).
    trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))
    with pytest.raises(UnsupportedStrategyError, match="LayerFreezing does not support strategy 'deepspeed'"):
        LayerFreezing(frozen="backbone").setup(trainer, Net(), "fit")  # type: ignore[arg-type]


def test_unfreezing_what_is_not_frozen_warns() -> None:
    with pytest.warns(
        UserWarning, match=r"unfreezes 'head' \(\['head.weight', 'head.bias'\]...\), which will not be frozen"
    ):
        fit(LayerFreezing(frozen="backbone", schedule=[{"epoch": 1, "unfreeze": "head"}]), max_epochs=1)


def test_unfreezing_params_no_optimizer_holds_warns() -> None:
    class FilteredNet(Net):
        def configure_optimizers(self) -> Any:
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    with pytest.warns(UserWarning, match="which no optimizer holds"):
        fit(
            LayerFreezing(frozen="backbone", schedule=[{"epoch": 1, "unfreeze": "backbone"}]),
            FilteredNet(),
            max_epochs=1,
        )


def test_lr_scale_without_lr_fails() -> None:
    cb = LayerFreezing(frozen="backbone", schedule=[{"epoch": 1, "unfreeze": "backbone", "lr_scale": 0.1}])
    with pytest.raises(ValueError, match="no lr to scale"):
        cb.plan_param_groups(Net(), {})


# ---------------------------------------------------------------------------------------------- against references
@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_unfreeze_by_epoch_matches_plain_loop_bitwise(opt: str) -> None:
    cb = LayerFreezing(frozen="backbone", schedule=[{"epoch": 1, "unfreeze": "backbone"}])
    model = fit(cb, Net(opt=opt), max_epochs=2)
    ref = reference_loop(opt, epochs=2, events={STEPS_PER_EPOCH: ("unfreeze", "backbone")})
    assert_states_bitwise_equal(model.state_dict(), ref.state_dict())


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_progressive_freeze_by_step_keeps_frozen_bitwise_and_matches_plain_loop(opt: str) -> None:
    cb = LayerFreezing(schedule=[{"step": 3, "freeze": "backbone.0"}])
    probe = fit(None, Net(opt=opt), max_steps=3)  # where backbone.0 stood when it froze (moments built up)
    model = fit(cb, Net(opt=opt), max_epochs=3)
    assert torch.equal(probe.backbone[0].weight, model.backbone[0].weight)
    assert not torch.equal(probe.head.weight, model.head.weight)
    ref = reference_loop(opt, epochs=3, events={3: ("freeze", "backbone.0")}, frozen=None)
    assert_states_bitwise_equal(model.state_dict(), ref.state_dict())


def test_frozen_batchnorm_statistics_unchanged_across_epochs_and_validation() -> None:
    class ValNet(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    for train_bn in (False, True):
        model = ValNet()
        before = model.backbone[1].running_mean.clone()
        quiet_trainer(callbacks=[LayerFreezing(frozen="backbone", train_bn=train_bn)], max_epochs=2).fit(
            model, data(), data(seed=2)
        )
        assert torch.equal(before, model.backbone[1].running_mean) is (not train_bn)
        assert model.backbone[1].weight.requires_grad is train_bn


def test_step_timing_respects_gradient_accumulation() -> None:
    seen: list[tuple[int, bool]] = []

    class Probe(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
            seen.append((trainer.global_step, pl_module.backbone[0].weight.grad is not None))

    cb = LayerFreezing(frozen="backbone", schedule=[{"step": 1, "unfreeze": "backbone"}])
    quiet_trainer(callbacks=[cb, Probe()], max_epochs=2, accumulate_grad_batches=2).fit(Net(), data())
    assert seen == [(0, False), (1, True)]  # unfrozen from the first micro-batch of optimizer step 1


def test_trainable_count_is_logged_and_changes_are_announced(caplog: pytest.LogCaptureFixture) -> None:
    cb = LayerFreezing(frozen="backbone", schedule=[{"epoch": 1, "unfreeze": "backbone.3"}])
    with caplog.at_level(logging.INFO):
        model = fit(cb, max_epochs=2)
    assert cb.trainable_params == sum(p.numel() for p in (*model.head.parameters(), *model.backbone[3].parameters()))
    assert "LayerFreezing at epoch 1: unfroze 2 tensors (backbone.3)" in caplog.text


# --------------------------------------------------------------------------------------- param groups, schedulers
def test_plan_param_groups_covers_every_parameter_once_with_scaled_lr() -> None:
    model = Net()
    cb = LayerFreezing(
        frozen="backbone",
        schedule=[{"epoch": 1, "unfreeze": "backbone.3", "lr_scale": 0.1}, {"epoch": 2, "unfreeze": "backbone.0"}],
    )
    groups = cb.plan_param_groups(model, {"lr": 1.0, "weight_decay": 0.1})
    assert [g["name"] for g in groups] == ["trainable", "unfreeze@epoch1", "unfreeze@epoch2", "frozen"]
    assert [g["lr"] for g in groups] == [1.0, 0.1, 1.0, 1.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert groups[3]["params"] == list(model.backbone[1].parameters())


@pytest.mark.parametrize("sched", ["lambda", "onecycle", "plateau"])
def test_lr_schedulers_survive_a_schedule_with_lr_scale(sched: str) -> None:
    cb = LayerFreezing(frozen="backbone", schedule=[{"epoch": 1, "unfreeze": "backbone", "lr_scale": 0.25}])
    model = Net(opt="adamw", groups=True, sched=sched)
    trainer = quiet_trainer(callbacks=[cb], max_epochs=3)
    trainer.fit(model, data())
    groups = trainer.optimizers[0].param_groups
    assert [g["name"] for g in groups] == ["trainable", "unfreeze@epoch1"]
    assert groups[1]["lr"] == pytest.approx(0.25 * groups[0]["lr"], rel=1e-6)
    if sched == "lambda":
        assert groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)


# ------------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("stop_epoch", [1, 2], ids=["before_unfreeze", "after_unfreeze"])
def test_resume_is_bit_exact_before_and_after_a_schedule_point(tmp_path: Path, stop_epoch: int) -> None:
    def make() -> tuple[LayerFreezing, Net]:
        schedule = [{"epoch": 1, "unfreeze": "backbone.3", "lr_scale": 0.5}, {"step": 5, "unfreeze": "backbone"}]
        return LayerFreezing(frozen="backbone", schedule=schedule), Net(opt="adamw", groups=True, sched="lambda")

    cb, full = make()
    fit(cb, full, max_epochs=3)

    cb, part = make()
    trainer = quiet_trainer(callbacks=[cb], max_epochs=stop_epoch)
    trainer.fit(part, data())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    cb, resumed = make()
    quiet_trainer(callbacks=[cb], max_epochs=3).fit(resumed, data(), ckpt_path=tmp_path / "mid.ckpt")
    assert_states_bitwise_equal(full.state_dict(), resumed.state_dict())
    assert not any(p.requires_grad is False for p in resumed.parameters())


def test_state_dict_is_keyed_by_parameter_name_and_two_instances_coexist() -> None:
    a = LayerFreezing(frozen="backbone.0")
    b = LayerFreezing(frozen="backbone.3")
    assert a.state_key != b.state_key
    model = Net()
    fit_trainer = quiet_trainer(callbacks=[a, b], max_epochs=1)
    fit_trainer.fit(model, data())
    assert a.state_dict()["frozen"] == ["backbone.0.weight", "backbone.0.bias", "backbone.3.weight", "backbone.3.bias"]
    with pytest.raises(ValueError, match="schedule entries"):
        a.load_state_dict({"applied": [True], "frozen": [], "held_norms": []})


# ---------------------------------------------------------------------------------------------------------- DDP
class Unfreeze(BaseFinetuning):
    """Lightning's own recipe for the same schedule (train_bn default True)."""

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        self.freeze(pl_module.backbone)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.backbone, optimizer, lr=0.05)


class FilteredNet(Net):
    def configure_optimizers(self) -> Any:  # what BaseFinetuning expects
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def _ddp_fit(tmp_path: Path, cb: L.Callback, model: Net, **kw: Any) -> list[dict[str, torch.Tensor]]:
    trainer = quiet_trainer(
        strategy="ddp_spawn", devices=2, callbacks=[cb, SaveParamsPerRank(tmp_path)], **{"max_epochs": 3, **kw}
    )
    trainer.fit(model, data(n=16, batch_size=4))  # the distributed sampler gives each rank different samples
    # Parameters only: DDP re-broadcasts BatchNorm buffers from rank 0 at each forward, after which they diverge.
    names = {n for n, _ in model.named_parameters()}
    return [{k: v for k, v in state.items() if k in names} for state in load_rank_states(tmp_path)]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_replicas_bit_identical_after_unfreeze_and_freeze(tmp_path: Path) -> None:
    # backbone.3: unknown to DDP, unfrozen later (we reduce it); backbone.0: trains from the start, frozen later
    # (without our exclusion from DDP, the step after its freeze raises DDP's unused-parameter error).
    cb = LayerFreezing(
        frozen="backbone.3",
        schedule=[{"step": 1, "unfreeze": "backbone.3"}, {"step": 2, "freeze": "backbone.0"}],
    )
    # 2 micro-batches per rank and epoch, accumulated: one optimizer step per epoch, 4 in all.
    rank0, rank1 = _ddp_fit(tmp_path, cb, Net(), accumulate_grad_batches=2, max_epochs=4)
    start = Net().state_dict()
    assert not torch.equal(rank0["backbone.3.weight"], start["backbone.3.weight"])  # unfrozen part did train
    assert_states_bitwise_equal(rank0, rank1)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_lightning_base_finetuning_drifts_in_the_same_setup(tmp_path: Path) -> None:
    rank0, rank1 = _ddp_fit(tmp_path, Unfreeze(), FilteredNet())
    drift = (rank0["backbone.3.weight"] - rank1["backbone.3.weight"]).abs().max().item()
    assert drift > 1e-4, "Lightning's BaseFinetuning no longer drifts: update the README claim"


def test_copy_keeps_configuration() -> None:
    cb = LayerFreezing(frozen=["backbone"], schedule=[{"epoch": 1, "unfreeze": "backbone"}])
    assert copy.deepcopy(cb).state_key == cb.state_key
