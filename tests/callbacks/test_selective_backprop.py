from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lit_partial import PartialBackpropMixin, SelectiveBackprop
from lit_partial.functional.selection_sampling import UnsupportedBatchError
from tests.helpers import SaveParamsPerRank, assert_states_bitwise_equal, load_rank_states, quiet_trainer

N, B = 32, 8
MAGNITUDE = torch.randperm(N, generator=torch.Generator().manual_seed(3)).float() + 1.0  # loss ordering of sample i


def items(n: int = N) -> list[dict[str, Any]]:
    """Sample i: x with squared norm proportional to MAGNITUDE[i], a nested ``meta`` (id, [id * 10])."""
    return [
        {"x": torch.full((4,), MAGNITUDE[i].sqrt().item() / 2), "y": torch.tensor([0.0]), "meta": (i, [i * 10])}
        for i in range(n)
    ]


class Ordered(PartialBackpropMixin, L.LightningModule):
    """Per-sample loss ``scale * |x|^2``: its ordering is MAGNITUDE's, whatever the (positive) scale."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.seen: list[list[int]] = []

    def per_sample_loss(self, batch: Any) -> Tensor:
        return self.scale * batch["x"].pow(2).sum(1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ids = batch["meta"][0]
        assert torch.equal(batch["meta"][1][0], ids * 10)  # nested parts sliced consistently
        self.seen.append(ids.tolist())
        return self.per_sample_loss(batch).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(items(), batch_size=B, shuffle=False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(model: L.LightningModule, cb: SelectiveBackprop, steps: int = 4, **kw: Any) -> L.Trainer:
    trainer = quiet_trainer(max_steps=steps, callbacks=[cb], **kw)
    trainer.fit(model)
    return trainer


def batch_ids(step: int) -> list[int]:
    return list(range(step * B % N, step * B % N + B))


def test_topk_trains_on_exactly_the_highest_losses() -> None:
    model, cb = Ordered(), SelectiveBackprop(keep=0.25, method="topk")
    metrics = fit(model, cb).callback_metrics
    for step, seen in enumerate(model.seen):
        ids = batch_ids(step)
        expected = sorted(sorted(ids, key=lambda i: -MAGNITUDE[i])[:2])
        assert seen == expected
    assert (cb.scored_samples, cb.backward_samples, cb.forward_samples) == (4 * B, 4 * 2, 4 * (B + 2))
    assert metrics["selective/selected_fraction"] == 0.25
    assert metrics["selective/loss_selected"] > 1.3 * metrics["selective/loss_all"]
    assert metrics["selective/forward_samples"] == 40


def test_outliers_drops_the_highest_losses() -> None:
    model, cb = Ordered(), SelectiveBackprop(keep=0.75, method="outliers")
    fit(model, cb)
    for step, seen in enumerate(model.seen):
        assert seen == sorted(sorted(batch_ids(step), key=lambda i: MAGNITUDE[i])[:6])


def test_probability_gives_every_step_the_same_size_and_prefers_high_losses() -> None:
    model, cb = Ordered(), SelectiveBackprop(keep=0.25, method="probability", seed=5)
    trainer = fit(model, cb, steps=40)
    assert [len(s) for s in model.seen] == [2] * 40  # pooled: exactly round(keep * B) every step
    trained = torch.tensor([i for s in model.seen for i in s])
    assert MAGNITUDE[trained].mean() > 1.4 * MAGNITUDE.mean()
    assert (cb.backward_samples, cb.scored_samples) == (80, 320)
    assert trainer.callback_metrics["selective/backward_samples"].item() == 80
    assert "selective/loss_selected" in trainer.callback_metrics


def test_window_and_full_batch_every_n_steps() -> None:
    model, cb = Ordered(), SelectiveBackprop(keep=0.25, start=2, end=6, unit="step", full_batch_every_n_steps=3)
    fit(model, cb, steps=7)
    # steps 0-1 before the window, 2 and 5 are every-3rd full steps, 6 after the window
    assert [len(s) for s in model.seen] == [8, 8, 8, 2, 2, 8, 8]
    assert cb.backward_samples == 5 * 8 + 2 * 2 and cb.scored_samples == 2 * 8


def test_fraction_window_uses_estimated_steps() -> None:
    model, cb = Ordered(), SelectiveBackprop(keep=0.25, start=0.5)
    fit(model, cb, steps=4)
    assert [len(s) for s in model.seen] == [8, 8, 2, 2]


class WithBatchNorm(PartialBackpropMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def per_sample_loss(self, batch: Any) -> Tensor:
        return F.mse_loss(self.net(batch["x"]), batch["y"], reduction="none").mean(1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_sample_loss(batch).mean()

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = [{"x": torch.randn(4, generator=g), "y": torch.randn(1, generator=g)} for _ in range(N)]
        return DataLoader(data, batch_size=B)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("score_mode", ["eval", "train"])
def test_matches_a_plain_pytorch_loop_and_updates_batchnorm_once(score_mode: str) -> None:
    model = WithBatchNorm()
    reference = copy.deepcopy(model.net)
    fit(model, SelectiveBackprop(keep=0.5, method="topk", score_mode=score_mode), steps=4)

    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for batch in model.train_dataloader():
        state = copy.deepcopy(reference.state_dict())
        reference.train(score_mode == "train")
        with torch.no_grad():
            scores = F.mse_loss(reference(batch["x"]), batch["y"], reduction="none").mean(1)
        reference.load_state_dict(state)  # the scoring pass must leave running statistics alone
        index = torch.sort(torch.sort(scores, descending=True, stable=True).indices[:4]).values
        reference.train()
        loss = F.mse_loss(reference(batch["x"][index]), batch["y"][index])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_states_bitwise_equal(model.net.state_dict(), reference.state_dict())
    assert model.net[1].num_batches_tracked.item() == 4


def test_exact_resume_with_pool_history_and_rng(tmp_path: Path) -> None:
    def run(max_epochs: int, ckpt: str | None = None) -> tuple[Ordered, SelectiveBackprop, L.Trainer]:
        torch.manual_seed(0)
        model, cb = Ordered(), SelectiveBackprop(keep=0.3, method="probability", history_size=12, seed=1)
        trainer = quiet_trainer(max_epochs=max_epochs, limit_train_batches=2, callbacks=[cb])
        trainer.fit(model, ckpt_path=ckpt)
        return model, cb, trainer

    full_model, full_cb, _ = run(2)
    _, half_cb, half = run(1)
    assert half_cb.state_dict()["pool"]["losses"].numel() > 0  # the checkpoint carries pooled samples
    half.save_checkpoint(tmp_path / "half.ckpt")
    resumed_model, resumed_cb, _ = run(2, str(tmp_path / "half.ckpt"))
    assert_states_bitwise_equal(full_model.state_dict(), resumed_model.state_dict())
    assert resumed_model.seen == full_model.seen[2:]
    assert [len(ids) for ids in resumed_model.seen] == [2, 2]  # it acted after the resume: round(0.3 * 8) rows each
    a, b = full_cb.state_dict(), resumed_cb.state_dict()
    assert torch.equal(a["history"], b["history"]) and torch.equal(a["pool"]["losses"], b["pool"]["losses"])
    assert (a["forward_samples"], a["backward_samples"]) == (b["forward_samples"], b["backward_samples"])


def test_two_instances_have_distinct_state_keys() -> None:
    assert SelectiveBackprop(keep=0.5).state_key != SelectiveBackprop(keep=0.25).state_key
    assert SelectiveBackprop(method="topk").state_key != SelectiveBackprop(method="outliers").state_key


def test_hook_removed_at_teardown() -> None:
    model = Ordered()
    fit(model, SelectiveBackprop(keep=0.5), steps=1)
    batch = [torch.arange(4.0)]
    assert model.on_after_batch_transfer(batch, 0) is batch  # no transform left: batches pass untouched
    assert not any(key.startswith("_lit_partial") for key in model.__dict__)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": 0}, r"`keep` must be a fraction in \(0, 1\], got 0"),
        ({"keep": 1.5}, r"`keep` must be a fraction in \(0, 1\], got 1.5"),
        ({"keep": True}, r"`keep` must be a fraction"),
        ({"method": "random"}, r"`method` must be one of .*'random'"),
        ({"history_size": 0}, r"`history_size` must be a positive integer, got 0"),
        ({"pool_size": -1}, r"`pool_size` must be a positive integer or None, got -1"),
        ({"unit": "epochs"}, r"`unit` must be one of .*'epochs'"),
        ({"start": -1}, r"`start` must be a number >= 0, got -1"),
        ({"start": 0.5, "end": 0.5}, r"`end` must be None or a number > start=0.5, got 0.5"),
        ({"start": 0.1, "end": 2}, r"unit='fraction', need 0 <= start < end <= 1"),
        ({"start": 1.5, "unit": "epoch"}, r"must be whole numbers, got 1.5"),
        ({"full_batch_every_n_steps": 0}, r"`full_batch_every_n_steps` must be a positive integer or None, got 0"),
        ({"score_mode": "none"}, r"`score_mode` must be one of .*'none'"),
        ({"seed": "a"}, r"`seed` must be an integer, got 'a'"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SelectiveBackprop(**kwargs)


class NotMixin(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.lin(batch["x"]).mean()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(items(), batch_size=B)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoPerSampleLoss(PartialBackpropMixin, NotMixin):
    pass


class WrongShape(Ordered):
    def per_sample_loss(self, batch: Any) -> Tensor:
        return self.scale * batch["x"].pow(2)  # (B, 4): forgot to reduce the feature dimension


class SkipsSuper(Ordered):
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch  # forgets super(): the transform never runs


class WithStrings(Ordered):
    def train_dataloader(self) -> DataLoader:
        return DataLoader([{**item, "name": f"s{i}"} for i, item in enumerate(items())], batch_size=B)


class OverridingDataModule(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(items(), batch_size=B)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (NotMixin(), TypeError, r"class NotMixin\(PartialBackpropMixin, L.LightningModule\)"),
        (NoPerSampleLoss(), NotImplementedError, r"NoPerSampleLoss.per_sample_loss\(batch\), which is not implemented"),
        (WrongShape(), ValueError, r"must return one loss per sample, shape \(8,\), got \(8, 4\)"),
        (SkipsSuper(), RuntimeError, r"call `super\(\).on_after_batch_transfer"),
        (WithStrings(), UnsupportedBatchError, r"builtins\.str at batch\['name'\]"),
    ],
)
def test_model_errors_before_or_at_the_first_step(model: L.LightningModule, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        fit(model, SelectiveBackprop(keep=0.5), steps=1)
    assert getattr(model, "seen", []) == []  # no training step ran


def test_datamodule_overriding_on_after_batch_transfer_is_an_error() -> None:
    trainer = quiet_trainer(max_steps=1, callbacks=[SelectiveBackprop(keep=0.5)])
    with pytest.raises(RuntimeError, match="OverridingDataModule overrides on_after_batch_transfer"):
        trainer.fit(Ordered(), datamodule=OverridingDataModule())


def test_fraction_window_needs_a_training_length() -> None:
    trainer = quiet_trainer(max_epochs=-1, max_steps=-1, callbacks=[SelectiveBackprop(keep=0.5, end=0.5)])
    with pytest.raises(ValueError, match="needs a known training length"):
        trainer.fit(Ordered())


class SaveCounters(L.Callback):
    """Each rank writes the selective callback's counters and the sizes of the batches it trained on."""

    def __init__(self, directory: Path, selective: SelectiveBackprop) -> None:
        self.directory, self.selective, self.sizes = directory, selective, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.sizes.append(len(batch["x"]))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        info = [self.selective.backward_samples, self.selective.scored_samples, self.sizes]
        torch.save(info, self.directory / f"counters{trainer.global_rank}.pt")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_spawn_ranks_stay_bit_identical(tmp_path: Path) -> None:
    model = WithBatchNorm()
    initial = model.net[0].weight.detach().clone()
    cb = SelectiveBackprop(keep=0.3, method="probability", seed=2)
    callbacks = [cb, SaveParamsPerRank(tmp_path), SaveCounters(tmp_path, cb)]
    trainer = quiet_trainer(strategy="ddp_spawn", devices=2, max_steps=4, callbacks=callbacks)
    trainer.fit(model)
    rank0, rank1 = load_rank_states(tmp_path)
    # BatchNorm running statistics are per rank (each normalises its own data); parameters must agree bitwise
    assert_states_bitwise_equal(
        {k: v for k, v in rank0.items() if "running" not in k}, {k: v for k, v in rank1.items() if "running" not in k}
    )
    assert not torch.equal(rank0["net.1.running_mean"], rank1["net.1.running_mean"])  # ranks saw different data
    assert not torch.equal(rank0["net.0.weight"], initial)  # it did train
    counters = [torch.load(tmp_path / f"counters{r}.pt") for r in range(2)]
    # every rank stepped on every batch with round(0.3 * 8) = 2 samples: no skipped step, no empty batch
    assert counters[0] == counters[1] == [8, 32, [2, 2, 2, 2]]
