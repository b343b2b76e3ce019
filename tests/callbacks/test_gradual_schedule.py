"""Schedules generated from a model's depth (``LayerFreezing.gradual``), and written out as YAML that parses back."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lit_partial import LayerFreezing
from lit_partial.app.config import CONF_DIR
from lit_partial.conditions import Metric
from lit_partial.demos import DigitsClassifier, ResidualFFN
from lit_partial.errors import ConfigurationError
from lit_partial.functional.freezing import BlockStack, find_block_stack
from tests.helpers.models import TinyNet


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (TinyNet(), BlockStack("blocks", ["blocks.0", "blocks.1", "blocks.2"], ["stem"], ["head"])),
        (DigitsClassifier(), BlockStack("backbone", ["backbone.0", "backbone.1", "backbone.2"], [], ["head"])),
        (  # the conv blocks differ from the residual ones: the residual stack is the repeated one
            DigitsClassifier(residual_blocks=4),
            BlockStack(
                "backbone.res",
                [f"backbone.res.{i}" for i in range(4)],
                ["backbone.0", "backbone.1", "backbone.2"],
                ["head"],
            ),
        ),
        (ResidualFFN(num_blocks=3, width=4), BlockStack("blocks", ["blocks.0", "blocks.1", "blocks.2"], [], [])),
    ],
    ids=["tiny", "digits", "digits_residual", "ffn"],
)
def test_the_block_stack_is_the_longest_container_of_same_class_blocks(model: nn.Module, expected: BlockStack) -> None:
    assert find_block_stack(model) == expected


def test_a_named_stack_takes_its_children_with_parameters() -> None:
    found = find_block_stack(DigitsClassifier(residual_blocks=2), stack="backbone")
    assert found.blocks == ["backbone.0", "backbone.1", "backbone.2", "backbone.res"]  # not the pooling, flatten
    assert (found.below, found.above) == ([], ["head"])


def test_parameters_outside_modules_wholly_on_one_side_are_named_themselves() -> None:
    model = nn.Module()
    model.scale = nn.Parameter(nn.init.ones_(nn.Linear(1, 1).weight))  # a parameter of the root, before the blocks
    model.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    model.norm = nn.LayerNorm(2)
    assert find_block_stack(model) == BlockStack("layers", ["layers.0", "layers.1"], ["scale"], ["norm"])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: find_block_stack(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(2, 2, 1))), "no ModuleList or Sequential"),
        (lambda: find_block_stack(TinyNet(), stack="blocks.0.act"), "holds no child with parameters"),
        (lambda: LayerFreezing.gradual(ResidualFFN(2, 4)), r"nothing after its blocks \(blocks\.\*\).*start_epoch=0"),
        (lambda: LayerFreezing.gradual(TinyNet(), freeze_below="yes"), "`freeze_below` is 'yes'"),
        (lambda: LayerFreezing.gradual(TinyNet(), lr_decay=0.5), ">= 1"),
        (lambda: LayerFreezing(frozen="a").to_yaml(style="toml"), "expected 'hydra'"),
        (
            lambda: LayerFreezing(schedule=[{"when": Metric("val_acc", ">", 0.9), "freeze": "a"}]).to_yaml(),
            r"schedule\[0\]\['when'\] is the object Metric\(.*give it in its dict form",
        ),
    ],
)
def test_what_cannot_be_planned_fails_naming_the_fix(call: object, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        call()  # type: ignore[operator]


def test_gradual_equals_the_hand_written_ulmfit_preset_for_the_digits_cnn() -> None:
    generated = LayerFreezing.gradual(DigitsClassifier(), lr_decay=2.6)
    preset = instantiate(OmegaConf.load(CONF_DIR / "partial" / "gradual_unfreeze.yaml").gradual_unfreeze)
    assert generated.frozen == preset.frozen
    assert [(e.kind, e.point, e.unfreeze) for e in generated.schedule] == [
        (e.kind, e.point, e.unfreeze) for e in preset.schedule
    ]
    # the preset rounds 1 / 2.6^k to four digits; the generated schedule has them exactly
    assert [e.lr_scale for e in generated.schedule] == [2.6**-1, 2.6**-2, 2.6**-3]
    assert [e.lr_scale for e in preset.schedule] == pytest.approx([2.6**-1, 2.6**-2, 2.6**-3], abs=5e-5)


def test_gradual_freezes_what_comes_before_the_blocks_and_unfreezes_it_last() -> None:
    hand_written = LayerFreezing(
        frozen=["stem", "blocks.0", "blocks.1", "blocks.2"],
        schedule=[
            {"epoch": 2, "unfreeze": "blocks.2"},
            {"epoch": 4, "unfreeze": "blocks.1"},
            {"epoch": 6, "unfreeze": "blocks.0"},
            {"epoch": 8, "unfreeze": "stem"},
        ],
    )
    assert LayerFreezing.gradual(TinyNet(), every_n_epochs=2).config() == hand_written.config()
    kept = LayerFreezing.gradual(TinyNet(), freeze_below=False, start_epoch=0)
    assert kept.frozen == ["blocks.0", "blocks.1", "blocks.2"] and [e.point for e in kept.schedule] == [0, 1, 2]


def test_the_hydra_yaml_instantiates_the_same_callback() -> None:
    cb = LayerFreezing.gradual(TinyNet(), lr_decay=2.6, train_bn=True)
    text = cb.to_yaml(name="gradual_tiny")
    assert text.splitlines()[:3] == [
        "gradual_tiny:",
        "  _target_: lit_partial.LayerFreezing",
        "  frozen: [stem, blocks.0, blocks.1, blocks.2]",
    ]
    built = instantiate(OmegaConf.create(text).gradual_tiny)
    assert isinstance(built, LayerFreezing)
    assert built.config() == cb.config() and built.state_key == cb.state_key


def test_a_when_entry_and_several_selectors_round_trip_too() -> None:
    plateau = {"plateau": "val_loss", "mode": "max", "patience": 2, "min_delta": 0.01}
    cb = LayerFreezing(
        frozen=["a", "b"],
        schedule=[
            {"step": 3, "unfreeze": ["a", "b"], "freeze": "c", "lr_scale": 0.3},
            {"when": plateau, "freeze": "a"},
        ],
        accept_config_change=True,
    )
    built = instantiate(OmegaConf.create(cb.to_yaml(name="x")).x)
    assert built.config() == cb.config() and built.accept_config_change


def test_the_lightning_cli_yaml_builds_the_same_callback(tmp_path: Path) -> None:
    pytest.importorskip("jsonargparse")
    from tests.helpers.cli import lightning_cli_example_main

    main = lightning_cli_example_main()

    cb = LayerFreezing.gradual(DigitsClassifier(), lr_decay=2.6)
    item = cb.to_yaml(style="lightning_cli")
    config = (
        "model:\n  class_path: lit_partial.demos.DigitsClassifier\n"
        "data:\n  class_path: lit_partial.demos.DigitsDataModule\n"
        "trainer:\n  callbacks:\n" + "".join(f"    {line}\n" for line in item.splitlines())
    )
    (tmp_path / "generated.yaml").write_text(config)
    cli = main(["--config", str(tmp_path / "generated.yaml"), "--trainer.logger=false"], run=False)
    (built,) = [c for c in cli.trainer.callbacks if isinstance(c, LayerFreezing)]
    assert built.config() == cb.config()
