"""Metric-driven conditions: LayerFreezing `when` entries, metric rules, lr_scale without partial_param_groups."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_partial import ConditionalDetach, LayerFreezing
from lit_partial.conditions import ConditionError
from lit_partial.errors import ConfigurationError
from tests.helpers import RecordGrads, assert_states_bitwise_equal, load_rank_states, quiet_trainer
from tests.helpers.models import TinyNet, tiny_loader
from tests.helpers.plateau import RANK1_SHIFT, SCORES, RecordTrainable, ScriptedNet, plateau_freezing

REPO = Path(__file__).resolve().parents[2]


def hand_plateau_epochs(values: list[float], patience: int, entries: int) -> list[int]:
    """By hand: the epochs at whose start successive plateau entries apply (each counts from the previous one)."""
    epochs, best, wait = [], float("inf"), 0
    for epoch, value in enumerate(values):
        if value < best:
            best, wait = value, 0
        else:
            wait += 1
        if wait >= patience:
            epochs.append(epoch + 1)  # recorded at the end of `epoch`, applied at the start of the next one
            best, wait = float("inf"), 0  # the next entry sees only evaluations after this one applied
            if len(epochs) == entries:
                break
    return epochs


def fit_scripted(callbacks: list[Callback], epochs: int, **kwargs: Any) -> ScriptedNet:
    torch.manual_seed(0)
    model = ScriptedNet()
    trainer = quiet_trainer(max_epochs=epochs, callbacks=callbacks, **kwargs)
    trainer.fit(model, tiny_loader(), tiny_loader(n=8))
    return model


def test_hand_computed_plateaus_are_what_the_test_expects() -> None:
    assert hand_plateau_epochs(SCORES, patience=2, entries=2) == [4, 7]


def test_plateau_entries_apply_at_the_epochs_of_a_hand_computed_plateau() -> None:
    record = RecordTrainable()
    freezing = plateau_freezing()
    fit_scripted([freezing, record], epochs=9)
    blocks_epoch, stem_epoch = hand_plateau_epochs(SCORES, patience=2, entries=2)
    assert blocks_epoch < stem_epoch
    assert next(e for e, trainable in record.trainable_at.items() if trainable) == stem_epoch
    assert freezing.metric_recorder.history["val_score"] == pytest.approx(SCORES[:9])
    assert any(f"epoch {blocks_epoch}" in line and "unfroze" in line for line in freezing.run_summary())
    assert any(f"epoch {stem_epoch}" in line and "unfroze" in line for line in freezing.run_summary())


def test_plateau_entries_resume_exactly(tmp_path: Path) -> None:
    full = fit_scripted([plateau_freezing(lr_scale=0.5)], epochs=9)

    torch.manual_seed(0)
    part = ScriptedNet()
    trainer = quiet_trainer(max_epochs=5, callbacks=[plateau_freezing(lr_scale=0.5)])
    trainer.fit(part, tiny_loader(), tiny_loader(n=8))  # the first entry applied (epoch 3), the second pending
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    torch.manual_seed(0)
    resumed = ScriptedNet()
    freezing, record = plateau_freezing(lr_scale=0.5), RecordTrainable()
    quiet_trainer(max_epochs=9, callbacks=[freezing, record]).fit(
        resumed, tiny_loader(), tiny_loader(n=8), ckpt_path=tmp_path / "mid.ckpt"
    )
    assert record.trainable_at == {5: False, 6: False, 7: True, 8: True}
    assert_states_bitwise_equal(full.state_dict(), resumed.state_dict())


@pytest.mark.slow
def test_plateau_entries_apply_at_rank0s_plateau_on_both_ddp_ranks(tmp_path: Path) -> None:
    script = "tests.helpers.ddp_scripts.plateau"
    subprocess.run([sys.executable, "-m", script, str(tmp_path)], check=True, timeout=300, cwd=REPO)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = hand_plateau_epochs(SCORES, patience=2, entries=2)[1]
    rank1_alone = hand_plateau_epochs([s + d for s, d in zip(SCORES, RANK1_SHIFT, strict=True)], patience=2, entries=2)
    assert rank1_alone != hand_plateau_epochs(SCORES, patience=2, entries=2)
    for result in results:
        trainable = [int(e) for e, t in result["trainable_at"].items() if t]
        assert trainable[0] == expected
    # rank 1 logged other values, yet both ranks recorded rank 0's, and the replicas stayed identical
    assert results[0]["history"] == results[1]["history"] == pytest.approx(SCORES[: len(results[0]["history"])])
    assert_states_bitwise_equal(*load_rank_states(tmp_path))


def test_a_missing_metric_is_an_error_at_the_first_check_naming_the_logged_ones() -> None:
    freezing = LayerFreezing(frozen="stem", schedule=[{"when": {"plateau": "val_loss"}, "unfreeze": "stem"}])
    with pytest.raises(ConfigurationError, match=r"val_loss.*Logged metrics: \['val_score'\]"):
        fit_scripted([freezing], epochs=2)


def test_metric_rules_of_conditional_detach_read_the_last_recorded_value() -> None:
    # val_score < 0.9 from the end of epoch 1 on: the stem is detached from epoch 2.
    detach = ConditionalDetach({"stem": {"metric": "val_score", "op": "<", "value": 0.9}})
    fit_scripted([detach], epochs=4)
    assert detach.totals["stem"] == [8.0, 16.0]  # 4 steps per epoch, epochs 2 and 3 detached
    assert detach.metric_recorder.history["val_score"] == pytest.approx(SCORES[:4])


def test_metric_history_is_recorded_after_validation_when_it_runs_every_other_epoch() -> None:
    detach = ConditionalDetach({"stem": {"plateau": "val_score", "patience": 1}})
    fit_scripted([detach], epochs=4, check_val_every_n_epoch=2)
    assert detach.metric_recorder.history["val_score"] == pytest.approx([SCORES[1], SCORES[3]])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"when": {"stat": "mean", "op": ">", "value": 0.0}, "unfreeze": "a"}, "activation statistic"),
        ({"when": {"plateau": "val_loss", "mode": "down"}, "unfreeze": "a"}, "`mode` must be 'min'"),
        ({"when": {"plateau": "val_loss", "patience": 0}, "unfreeze": "a"}, "`patience` must be an integer >= 1"),
        ({"when": {"plateau": "", "patience": 1}, "unfreeze": "a"}, "must name a logged metric"),
        ({"when": {"metric": "val_loss", "op": "~", "value": 1}, "unfreeze": "a"}, "`op` must be one of"),
        ({"when": {"plateau": "val_loss", "min_delta": -1}, "unfreeze": "a"}, "`min_delta` must be a finite"),
        ({"when": "always", "epoch": 1, "unfreeze": "a"}, "both 'epoch' and 'when'"),
    ],
)
def test_bad_when_entries_fail_before_training(spec: dict[str, Any], match: str) -> None:
    with pytest.raises((ConditionError, ConfigurationError), match=match):
        LayerFreezing(frozen="a", schedule=[spec])


# ---------------------------------------------------------------- lr_scale without partial_param_groups


class PlainOptimizerNet(TinyNet):
    """Builds its optimizer from self.parameters(), as LightningCLI's `optimizer:` does (one group)."""

    def __init__(self, sched: str | None = None) -> None:
        super().__init__()
        self.sched = sched

    @override
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        if self.sched == "lambda":
            return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)]
        if self.sched == "onecycle":
            return [opt], [torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)]
        return opt


class PlannedNet(TinyNet):
    @override
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.partial_param_groups(lr=0.1))
        return [opt], [torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e)]


def epoch_freezing() -> LayerFreezing:
    return LayerFreezing(frozen="stem", schedule=[{"epoch": 1, "unfreeze": "stem", "lr_scale": 0.1}])


def test_lr_scale_applies_when_the_optimizer_was_built_without_partial_param_groups() -> None:
    torch.manual_seed(0)
    plain, record = PlainOptimizerNet(sched="lambda"), RecordGrads()
    trainer = quiet_trainer(max_epochs=3, callbacks=[epoch_freezing(), record])
    trainer.fit(plain, tiny_loader())
    steps = len(tiny_loader())
    assert ["stem.weight" in none for none in record.no_grad] == [True] * steps + [False] * 2 * steps  # it froze
    groups = trainer.optimizers[0].param_groups
    assert [g.get("name") for g in groups] == [None, "unfreeze@epoch1"]
    assert groups[1]["params"] == [plain.stem.weight, plain.stem.bias]
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)  # after 3 LambdaLR steps: 0.1 * 0.5**3 each
    torch.manual_seed(0)
    planned = PlannedNet()
    quiet_trainer(max_epochs=3, callbacks=[epoch_freezing()]).fit(planned, tiny_loader())
    assert_states_bitwise_equal(planned.state_dict(), plain.state_dict())  # the same run as with planned groups


def test_lr_scale_split_groups_resume_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    full = PlainOptimizerNet(sched="lambda")
    quiet_trainer(max_epochs=3, callbacks=[epoch_freezing()]).fit(full, tiny_loader())
    torch.manual_seed(0)
    part, record = PlainOptimizerNet(sched="lambda"), RecordGrads()
    trainer = quiet_trainer(max_epochs=2, callbacks=[epoch_freezing(), record])
    trainer.fit(part, tiny_loader())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    assert ["stem.weight" in none for none in record.no_grad] == [True] * 4 + [False] * 4  # frozen in epoch 0
    resumed = PlainOptimizerNet(sched="lambda")
    trainer = quiet_trainer(max_epochs=3, callbacks=[epoch_freezing()])
    trainer.fit(resumed, tiny_loader(), ckpt_path=tmp_path / "mid.ckpt")
    assert_states_bitwise_equal(full.state_dict(), resumed.state_dict())
    # it acted after the resume: the stem trains in a group of its own at a tenth of the rate
    stem = next(g for g in trainer.optimizers[0].param_groups if any(p is resumed.stem.weight for p in g["params"]))
    rest = next(g for g in trainer.optimizers[0].param_groups if g is not stem)
    assert stem["params"] == [resumed.stem.weight, resumed.stem.bias] and stem["lr"] == pytest.approx(rest["lr"] * 0.1)


def test_a_scheduler_that_cannot_take_new_groups_gets_a_warning_naming_the_fix() -> None:
    with pytest.warns(UserWarning, match=r"OneCycleLR.*partial_param_groups\(lr=...\)"):
        quiet_trainer(max_steps=1, callbacks=[epoch_freezing()]).fit(PlainOptimizerNet("onecycle"), tiny_loader())
