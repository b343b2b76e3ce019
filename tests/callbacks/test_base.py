"""The ``Technique`` contract: configuration-checked resume, unwinding on exceptions, stage guard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from lit_partial import (
    CheckpointMismatchError,
    ConditionalDetach,
    ConfigurationError,
    GradientMasking,
    LayerFreezing,
    SelectiveBackprop,
)
from lit_partial.callbacks.base import Technique
from tests.helpers import RecordGrads, assert_states_bitwise_equal, quiet_trainer
from tests.helpers.models import TinyNet, tiny_loader


class Net(TinyNet):
    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return (self(x) - y).pow(2).mean(1)


def checkpoint(tmp_path: Path, callbacks: list[L.Callback], steps: int = 2) -> Path:
    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=steps, callbacks=callbacks)
    trainer.fit(Net(), tiny_loader())
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    return path


def resume(path: Path, callbacks: list[L.Callback], steps: int = 4) -> TinyNet:
    torch.manual_seed(0)
    model = Net()
    quiet_trainer(max_steps=steps, callbacks=callbacks).fit(model, tiny_loader(), ckpt_path=path)
    return model


@pytest.mark.parametrize(
    ("before", "after", "match"),
    [
        (
            lambda: ConditionalDetach({"stem": {"every_n_steps": 2}}),
            lambda: ConditionalDetach({"stem": {"every_n_steps": 3}}),
            r"ConditionalDetach.*which this run does not have\. This run has ConditionalDetach with a different "
            r"configuration \(rules: .*\"every_n_steps\": 2.*-> .*\"every_n_steps\": 3",  # plain data, no repr
        ),
        (
            lambda: LayerFreezing(frozen="blocks.0", schedule=[{"step": 3, "unfreeze": "blocks.0"}]),
            lambda: LayerFreezing(frozen="blocks.0", schedule=[{"step": 1, "unfreeze": "blocks.0"}]),
            r"LayerFreezing.*different configuration \(schedule: .*\"point\": 3.*-> .*\"point\": 1",
        ),
        (
            lambda: GradientMasking({"head.weight": {"kind": "random", "keep": 0.5}}),
            lambda: GradientMasking({"head.weight": {"kind": "random", "keep": 0.25}}),
            r"GradientMasking.*\"keep\": 0\.5.*-> .*\"keep\": 0\.25",
        ),
        (
            lambda: SelectiveBackprop(keep=0.5),
            lambda: SelectiveBackprop(keep=0.25),
            r"SelectiveBackprop.*keep: 0\.5 -> 0\.25",
        ),
    ],
    ids=["detach", "freezing", "masking", "selective"],
)
def test_resuming_with_a_changed_configuration_is_an_error_naming_the_change(
    tmp_path: Path, before: Any, after: Any, match: str
) -> None:
    path = checkpoint(tmp_path, [before()])
    with pytest.raises(CheckpointMismatchError, match=match):
        resume(path, [after()])
    with pytest.raises(CheckpointMismatchError, match="accept_config_change=True"):
        resume(path, [after()])


def test_accept_config_change_resumes_with_the_new_configuration(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, [ConditionalDetach({"stem": {"every_n_steps": 2}})])
    record = RecordGrads()
    with pytest.warns(UserWarning, match="not resumed \\(accept_config_change=True\\)"):
        changed = resume(path, [ConditionalDetach({"stem": {"every_n_steps": 3}}, accept_config_change=True), record])
    # the same as resuming the weights with a fresh callback of the new configuration
    fresh = resume(path, [_DropTechniqueStates(), ConditionalDetach({"stem": {"every_n_steps": 3}})])
    assert_states_bitwise_equal(changed.state_dict(), fresh.state_dict())
    assert ["stem.weight" in none for none in record.no_grad] == [False, True]  # steps 2, 3: the new rule acted


class _DropTechniqueStates(L.Callback):
    """Removes lit_partial states from the loaded checkpoint (what accept_config_change amounts to)."""

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        for key in [k for k, v in checkpoint["callbacks"].items() if isinstance(v, dict) and "lit_partial" in v]:
            del checkpoint["callbacks"][key]


@pytest.mark.parametrize("remaining", [[], [LayerFreezing(frozen="blocks.0")]], ids=["none left", "another left"])
def test_resuming_without_a_technique_of_the_checkpoint_is_an_error(tmp_path: Path, remaining: list[Any]) -> None:
    path = checkpoint(tmp_path, [ConditionalDetach({"stem": "always"})])
    with pytest.raises(CheckpointMismatchError, match=r"ConditionalDetach.*which this run does not have.*Fix"):
        resume(path, remaining)


def test_resume_with_the_same_configuration_restores_the_state(tmp_path: Path) -> None:
    path = checkpoint(tmp_path, [ConditionalDetach({"stem": {"every_n_steps": 2}})])
    detach, record = ConditionalDetach({"stem": {"every_n_steps": 2}}), RecordGrads()
    resume(path, [detach, record])
    assert detach.totals["stem"] == [2.0, 4.0]  # 1 of 2 steps before the checkpoint, 1 of 2 after
    assert ["stem.weight" in none for none in record.no_grad] == [True, False]  # steps 2, 3: it detached at step 2


class Boom(TinyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        raise RuntimeError("a bug in the user's model")


def test_a_failed_fit_leaves_the_model_as_it_was() -> None:
    model = Boom()
    callbacks = [ConditionalDetach({"stem": "always", "features": "always"}), GradientMasking({"head": torch.ones(1)})]
    with pytest.raises(RuntimeError, match="a bug in the user's model"):
        quiet_trainer(max_steps=1, callbacks=callbacks).fit(model, tiny_loader())
    assert not model.stem._forward_hooks
    assert not any(k.startswith("_lit_partial") for m in model.modules() for k in m.__dict__)


def test_only_fit_attaches() -> None:
    class Probe(Technique):
        attached = 0

        def config(self) -> dict[str, Any]:
            return {}

        def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.attached += 1

    probe = Probe()
    trainer = quiet_trainer(max_steps=1, callbacks=[probe], limit_val_batches=1)
    trainer.fit(TinyNet(), tiny_loader(), tiny_loader())
    trainer.validate(TinyNet(), tiny_loader())
    assert probe.attached == 1 and probe.model is None


def test_accept_config_change_must_be_a_bool() -> None:
    with pytest.raises(ConfigurationError, match=r"`accept_config_change` must be True or False, got 'yes'"):
        ConditionalDetach({"stem": "always"}, accept_config_change="yes")  # type: ignore[arg-type]
