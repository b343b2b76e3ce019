"""LayerFreezing's optimizer groups: distinct names for LearningRateMonitor, and a changed schedule on resume."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lit_partial import LayerFreezing
from lit_partial.callbacks._freezing_schedule import group_names, parse_schedule
from lit_partial.callbacks._group_state import match_groups, remap_optimizer_state, remap_scheduler_state
from tests.callbacks.test_layer_freezing import Net, data
from tests.helpers import assert_states_bitwise_equal, quiet_trainer

TWO_AT_EPOCH_1 = [
    {"epoch": 1, "unfreeze": "backbone.0", "lr_scale": 0.1},
    {"epoch": 1, "unfreeze": "backbone.3", "lr_scale": 0.5},
]


class TwoGroupNet(Net):
    """A hand-written optimizer with two unnamed groups (weights decayed, biases not), as many users write it."""

    def configure_optimizers(self) -> Any:
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in self.named_parameters() if not n.endswith("weight")]
        return torch.optim.SGD([{"params": decay, "weight_decay": 0.01}, {"params": rest}], lr=0.05)


def lr_columns(directory: Path) -> dict[str, float]:
    """The LearningRateMonitor columns of a CSVLogger's metrics.csv, with their last logged value."""
    with open(next(directory.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    return {key: float(next(r[key] for r in reversed(rows) if r[key])) for key in rows[0] if key.startswith("lr-")}


def monitored_fit(tmp_path: Path, model: Net, max_epochs: int, ckpt: Path | None = None) -> L.Trainer:
    trainer = quiet_trainer(
        callbacks=[LayerFreezing(frozen="backbone", schedule=TWO_AT_EPOCH_1), LearningRateMonitor()],
        logger=CSVLogger(tmp_path, name="", version=""),
        log_every_n_steps=1,
        max_epochs=max_epochs,
    )
    trainer.fit(model, data(), ckpt_path=ckpt)
    return trainer


def test_entries_sharing_a_point_get_names_that_say_what_they_unfreeze() -> None:
    entries = parse_schedule(
        [
            {"epoch": 1, "unfreeze": "a"},
            {"epoch": 1, "unfreeze": ["b", "c"]},
            {"epoch": 1, "freeze": "a"},  # unfreezes nothing: no group
            {"step": 1, "unfreeze": "a"},  # another kind at the same number: no clash
            {"epoch": 2, "unfreeze": "d"},
            {"epoch": 2, "unfreeze": "d"},  # the same selectors twice: the schedule index tells them apart
        ]
    )
    assert group_names(entries) == [
        "unfreeze@epoch1[a]",
        "unfreeze@epoch1[b,c]",
        None,
        "unfreeze@step1",
        "unfreeze@epoch2[d]#4",
        "unfreeze@epoch2[d]#5",
    ]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (  # partial_param_groups: one group per phase; backbone.1 (BatchNorm) is never unfrozen
            Net(groups=True),
            {
                "lr-SGD/trainable": 0.05,
                "lr-SGD/unfreeze@epoch1[backbone.0]": 0.005,
                "lr-SGD/unfreeze@epoch1[backbone.3]": 0.025,
                "lr-SGD/frozen": 0.05,
            },
        ),
        (  # one unnamed group, split for the two lr_scales (LearningRateMonitor calls the unnamed group pg1)
            Net(groups=False),
            {
                "lr-SGD/pg1": 0.05,
                "lr-SGD/unfreeze@epoch1[backbone.0]": 0.005,
                "lr-SGD/unfreeze@epoch1[backbone.3]": 0.025,
            },
        ),
        (  # two unnamed groups: each split group says which group it came from
            TwoGroupNet(),
            {
                "lr-SGD/pg1": 0.05,
                "lr-SGD/pg2": 0.05,
                "lr-SGD/pg1/unfreeze@epoch1[backbone.0]": 0.005,
                "lr-SGD/pg1/unfreeze@epoch1[backbone.3]": 0.025,
                "lr-SGD/pg2/unfreeze@epoch1[backbone.0]": 0.005,
                "lr-SGD/pg2/unfreeze@epoch1[backbone.3]": 0.025,
            },
        ),
    ],
    ids=["planned", "plain", "plain_two_groups"],
)
def test_learning_rate_monitor_logs_every_group_under_its_own_name_also_after_resume(
    tmp_path: Path, model: Net, expected: dict[str, float]
) -> None:
    full = monitored_fit(tmp_path / "full", model, max_epochs=2)
    assert lr_columns(tmp_path / "full") == pytest.approx(expected)

    kind = type(model)
    part = monitored_fit(tmp_path / "part", kind(groups=model.groups) if kind is Net else kind(), max_epochs=1)
    part.save_checkpoint(tmp_path / "mid.ckpt")
    resumed_model = kind(groups=model.groups) if kind is Net else kind()
    resumed = monitored_fit(tmp_path / "resumed", resumed_model, max_epochs=2, ckpt=tmp_path / "mid.ckpt")
    assert lr_columns(tmp_path / "resumed") == pytest.approx(expected)
    names = [[g.get("name") for g in t.optimizers[0].param_groups] for t in (full, resumed)]
    assert names[0] == names[1]
    assert_states_bitwise_equal(model.state_dict(), resumed_model.state_dict())  # and the resume is exact


# ------------------------------------------------------------------------------- a changed schedule on resume
class OptimizerAtStart(L.Callback):
    """The optimizer's state by parameter name and its groups, as training starts (after Lightning restored them)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.state = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
        self.groups = [(g.get("name"), [names[id(p)] for p in g["params"]], g["lr"]) for g in optimizer.param_groups]


def checkpoint_state_by_name(path: Path, order: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's per-parameter optimizer state, named by the hand-written parameter order of its groups."""
    saved = torch.load(path, weights_only=True)["optimizer_states"][0]
    ids = [i for g in saved["param_groups"] for i in g["params"]]
    assert len(ids) == len(order)
    return {name: saved["state"][i] for name, i in zip(order, ids, strict=True) if i in saved["state"]}


def train_then_resume_changed(
    tmp_path: Path, model: type[Net], kw: dict[str, Any], before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> tuple[OptimizerAtStart, Net, L.Trainer]:
    trainer = quiet_trainer(callbacks=[LayerFreezing(frozen="backbone", schedule=before)], max_epochs=2)
    trainer.fit(model(**kw), data())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    probe, resumed = OptimizerAtStart(), model(**kw)
    cb = LayerFreezing(frozen="backbone", schedule=after, accept_config_change=True)
    trainer = quiet_trainer(callbacks=[cb, probe], max_epochs=3)
    trainer.fit(resumed, data(), ckpt_path=tmp_path / "a.ckpt")
    return probe, resumed, trainer


def test_an_added_group_resumes_with_adamw_moments_and_decayed_rates_of_the_groups_kept(tmp_path: Path) -> None:
    before = [{"epoch": 1, "unfreeze": "backbone.3"}]
    after = [*before, {"epoch": 2, "unfreeze": "backbone.0", "lr_scale": 0.5}]  # one group more
    probe, resumed, trainer = train_then_resume_changed(
        tmp_path, Net, {"opt": "adamw", "groups": True, "sched": "lambda"}, before, after
    )
    # The checkpoint's groups, written out: trainable (head), unfreeze@epoch1 (backbone.3), frozen (the rest).
    order = ["head.weight", "head.bias", "backbone.3.weight", "backbone.3.bias"]
    order += ["backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias"]
    saved = checkpoint_state_by_name(tmp_path / "a.ckpt", order)
    assert set(saved) == {"head.weight", "head.bias", "backbone.3.weight", "backbone.3.bias"}  # what trained
    assert probe.state.keys() == saved.keys()
    for name, moments in saved.items():
        assert probe.state[name].keys() == moments.keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in moments.items():
            assert torch.equal(probe.state[name][key], value), (name, key)
    decayed = 0.05 * 0.5**2  # LambdaLR(0.5 ** epoch) after two epochs
    assert probe.groups == [
        ("trainable", ["head.weight", "head.bias"], decayed),
        ("unfreeze@epoch1", ["backbone.3.weight", "backbone.3.bias"], decayed),
        ("unfreeze@epoch2", ["backbone.0.weight", "backbone.0.bias"], pytest.approx(0.5 * decayed)),  # new: joins
        ("frozen", ["backbone.1.weight", "backbone.1.bias"], decayed),
    ]
    # The new entry applied at epoch 2, and the scheduler (its position kept, its base rates extended) went on.
    assert not torch.equal(resumed.backbone[0].weight, Net().backbone[0].weight)
    after_epoch_2 = [0.05 * 0.5**3, 0.05 * 0.5**3, 0.025 * 0.5**3, 0.05 * 0.5**3]
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx(after_epoch_2)


def test_an_added_lr_scale_splits_a_plain_sgd_optimizer_and_momentum_follows_each_parameter(tmp_path: Path) -> None:
    before = [{"epoch": 1, "unfreeze": "backbone"}]
    after = [{"epoch": 1, "unfreeze": "backbone", "lr_scale": 0.1}]  # the backbone moves to a group of its own
    probe, resumed, _ = train_then_resume_changed(tmp_path, Net, {"opt": "sgd"}, before, after)
    order = [n for n, _ in Net().named_parameters()]  # one group, in model order
    saved = checkpoint_state_by_name(tmp_path / "a.ckpt", order)
    assert saved.keys() == probe.state.keys() == set(order)  # everything trained in epoch 1
    for name, state in saved.items():
        assert torch.equal(probe.state[name]["momentum_buffer"], state["momentum_buffer"]), name
    backbone = [n for n in order if n.startswith("backbone.")]
    assert probe.groups == [
        (None, ["head.weight", "head.bias"], 0.05),
        ("unfreeze@epoch1", backbone, pytest.approx(0.005)),
    ]
    # Against plain PyTorch: the checkpoint's weights and momentum, the new groups, one more epoch.
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    ref = Net()
    ref.load_state_dict(ckpt["state_dict"])
    params = dict(ref.named_parameters())
    sgd = torch.optim.SGD(
        [
            {"params": [params["head.weight"], params["head.bias"]]},
            {"params": [params[n] for n in backbone], "lr": 0.005},
        ],
        lr=0.05,
        momentum=0.9,
    )
    for name, state in saved.items():
        sgd.state[params[name]] = {"momentum_buffer": state["momentum_buffer"].clone()}
    ref.train()
    for x, y in data():
        sgd.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        sgd.step()
    assert_states_bitwise_equal(ref.state_dict(), resumed.state_dict())


def test_a_changed_layout_without_a_record_of_its_groups_starts_the_optimizer_fresh(tmp_path: Path) -> None:
    cb = LayerFreezing(frozen="backbone", schedule=[{"epoch": 1, "unfreeze": "backbone"}])
    trainer = quiet_trainer(callbacks=[cb], max_epochs=2)
    trainer.fit(Net(), data())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)
    for state in ckpt["callbacks"].values():
        state.pop("optimizer_layouts")  # as a checkpoint made before LayerFreezing recorded its groups
    torch.save(ckpt, tmp_path / "old.ckpt")
    probe = OptimizerAtStart()
    cb = LayerFreezing(
        frozen="backbone", schedule=[{"epoch": 1, "unfreeze": "backbone", "lr_scale": 0.1}], accept_config_change=True
    )
    with pytest.warns(UserWarning, match=r"does not record which parameters its groups held .* starts fresh"):
        quiet_trainer(callbacks=[cb, probe], max_epochs=3).fit(Net(), data(), ckpt_path=tmp_path / "old.ckpt")
    assert probe.state == {}
    assert [lr for _, _, lr in probe.groups] == pytest.approx([0.05, 0.005])


def test_kept_groups_keep_their_schedule_progress_at_a_new_configured_rate() -> None:
    saved = {"state": {}, "param_groups": [{"params": [0], "lr": 0.02, "initial_lr": 0.1, "momentum": 0.5}]}
    fresh = {"state": {}, "param_groups": [{"params": [0], "lr": 0.01, "initial_lr": 0.01, "momentum": 0.9}]}
    layout = [{"name": "unfreeze@epoch1", "params": ["w"]}]
    (group,) = remap_optimizer_state(saved, layout, fresh, layout)["param_groups"]
    # lr_scale changed 0.1 -> 0.01: a fifth of the way through the schedule at the old rate is a fifth at the new
    assert group == {"params": [0], "lr": pytest.approx(0.002), "initial_lr": 0.01, "momentum": 0.5}


def test_groups_are_matched_by_name_then_by_position_among_unnamed_then_by_parameters() -> None:
    old = [{"name": None, "params": ["a"]}, {"name": "x", "params": ["b"]}, {"name": "y", "params": ["c"]}]
    new = [{"name": None, "params": ["a", "d"]}, {"name": "z", "params": ["c"]}, {"name": "x", "params": []}]
    assert match_groups(old, new) == [0, 2, 1]


def test_scheduler_state_keeps_its_position_and_takes_the_new_per_group_lists() -> None:
    saved = {"last_epoch": 7, "_step_count": 8, "base_lrs": [0.1], "_last_lr": [0.01], "milestones": {3: 1}}
    fresh = {"last_epoch": 0, "_step_count": 1, "base_lrs": [0.1, 0.5], "_last_lr": [0.1, 0.5], "milestones": {3: 1}}
    nested = remap_scheduler_state({"_schedulers": [saved]}, {"_schedulers": [fresh]}, [0.01, 0.05], old_groups=1)
    expected = {
        "last_epoch": 7,
        "_step_count": 8,
        "base_lrs": [0.1, 0.5],
        "_last_lr": [0.01, 0.05],
        "milestones": {3: 1},
    }
    assert nested == {"_schedulers": [expected]}
