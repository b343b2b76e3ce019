"""Every YAML file of the main job's config tree composes, its keys match its target's constructor, it instantiates."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lit_partial.app.cli import closest_keys
from lit_partial.app.config import CONF_DIR as CONF
from lit_partial.selectors import select_modules
from tests.helpers.cli import compose_train

GROUP_FILES = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))


def targets(node: Any, path: str = "") -> list[tuple[str, DictConfig]]:
    """Every (key path, config) in ``node`` that has a ``_target_``."""
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path, node))
        for key in node:
            found += targets(node[key], f"{path}.{key}" if path else str(key))
    return found


def constructor_params(target: str) -> tuple[set[str], bool]:
    module_name, _, attr = target.rpartition(".")
    obj = getattr(importlib.import_module(module_name), attr)
    params = inspect.signature(obj).parameters
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return set(params), accepts_kwargs


def test_every_group_has_files() -> None:
    groups = {group for group, _ in GROUP_FILES}
    assert {"model", "data", "trainer", "logger", "callbacks", "partial", "experiment", "debug"} <= groups


@pytest.mark.parametrize(("group", "name"), GROUP_FILES, ids=[f"{g}/{n}" for g, n in GROUP_FILES])
def test_yaml_composes_and_keys_match_constructor(group: str, name: str, tmp_path: Path) -> None:
    cfg = compose_train(f"{group}={name}", output_dir=str(tmp_path))
    node = cfg.get(group)
    for key_path, conf in targets(node, group):
        target = conf["_target_"]
        assert (
            not target.startswith("lit_partial.") or target.count(".") == 1 or target.startswith("lit_partial.demos.")
        ), f"{key_path}: _target_ {target!r} should be the public import path (lit_partial.<Name>)"
        params, accepts_kwargs = constructor_params(target)
        keys = {k for k in conf if not str(k).startswith("_")}
        unknown = keys - params
        assert accepts_kwargs or not unknown, f"{group}/{name}.yaml {key_path}: keys {unknown} not in {target}"
        instantiated = instantiate(conf)
        assert type(instantiated).__name__ == target.rpartition(".")[2] or callable(instantiated)


def test_partial_presets_are_one_named_entry() -> None:
    for path in sorted(CONF.glob("partial/*.yaml")):
        data = OmegaConf.load(path)
        if path.stem == "none":
            assert not data
            continue
        assert list(data) == [path.stem], f"{path.name}: the single top-level key must be {path.stem!r}"


def test_trainer_yaml_keys_are_trainer_arguments() -> None:
    trainer_args = set(inspect.signature(L.Trainer.__init__).parameters)
    for path in sorted(CONF.glob("trainer/*.yaml")):
        keys = {k for k in OmegaConf.load(path) if k != "defaults"}
        assert keys <= trainer_args, f"{path.name}: {keys - trainer_args} are not lightning.Trainer arguments"


def test_typed_override_is_converted_and_bad_type_rejected() -> None:
    cfg = compose_train("trainer.max_epochs=5", "trainer.limit_train_batches=2")
    assert cfg.trainer.max_epochs == 5 and cfg.trainer.limit_train_batches == 2
    with pytest.raises(Exception, match=r"Error merging override trainer.max_epochs=abc"):
        compose_train("trainer.max_epochs=abc")
    with pytest.raises(Exception, match=r"Could not override 'trainer.not_an_argument'") as info:
        compose_train("trainer.not_an_argument=1")
    assert "not in 'TrainerConfig'" in str(info.value.__cause__)


def test_several_partial_presets_combine(tmp_path: Path) -> None:
    presets = [p.stem for p in CONF.glob("partial/*.yaml") if p.stem != "none"][:2]
    if len(presets) < 2:
        pytest.skip("needs two partial presets")
    cfg = compose_train(f"partial=[{','.join(presets)}]", output_dir=str(tmp_path))
    assert sorted(cfg.partial) == sorted(presets)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.lr=abc", r"Error merging override model.lr=abc"),
        ("model.channels=[a]", r"Error merging override model.channels=\[a\]"),
        ("data.batch_size=x", r"Error merging override data.batch_size=x"),
        ("data.classes=x", r"Error merging override data.classes=x"),
        ("model.not_an_argument=1", r"Could not override 'model.not_an_argument'"),
        ("data.not_an_argument=1", r"Could not override 'data.not_an_argument'"),
        ("pretrain.max_epochs=x", r"Error merging override pretrain.max_epochs=x"),
    ],
)
def test_model_data_and_pretrain_values_are_type_checked_when_composed(override: str, match: str) -> None:
    with pytest.raises(Exception, match=match):
        compose_train(override)


def test_num_classes_follows_data_classes() -> None:
    assert compose_train().model.num_classes == 5
    assert compose_train("data.classes=null").model.num_classes == 10
    assert compose_train("data.classes=[1,2,3]").model.num_classes == 3


def test_closest_keys_suggest_the_key_meant() -> None:
    cfg = compose_train()
    assert closest_keys("trainer.max_epoch", cfg)[0] == "trainer.max_epochs"
    assert closest_keys("lr", cfg)[0] == "model.lr"
    assert closest_keys("data.batchsize", cfg)[0] == "data.batch_size"


@pytest.mark.parametrize(
    ("experiment", "preset", "settings"),
    [
        ("stochastic_depth", "stochastic_depth", {"model.residual_blocks": 4}),
        ("unfreeze_on_plateau", "unfreeze_on_plateau", {"trainer.max_epochs": 12}),
        (
            "digits_rnn",
            "memory_monitor",
            {"model._target_": "lit_partial.demos.DigitsRNN", "data.sequence": True, "pretrain.enabled": False},
        ),
    ],
)
def test_an_experiment_is_its_preset_plus_the_settings_it_needs(
    experiment: str, preset: str, settings: dict[str, Any]
) -> None:
    cfg = compose_train(f"experiment={experiment}")
    assert list(cfg.partial) == [preset]
    assert {key: OmegaConf.select(cfg, key) for key in settings} == settings
    assert compose_train("experiment=stochastic_depth", "model.residual_blocks=2").model.residual_blocks == 2
    assert list(compose_train("experiment=stochastic_depth", "partial=freeze_backbone").partial) == ["freeze_backbone"]


def test_the_stochastic_depth_experiment_gives_its_selector_blocks_to_skip() -> None:
    # Without the experiment the default CNN has no residual blocks: the preset's selector matches nothing.
    cfg = compose_train("experiment=stochastic_depth")
    model = instantiate(cfg.model, _convert_="all")
    selected = select_modules(model, cfg.partial.stochastic_depth.blocks)
    assert [name for name, _ in selected] == [f"backbone.res.{i}" for i in range(4)]
    plain = instantiate(compose_train("partial=stochastic_depth").model, _convert_="all")
    with pytest.raises(Exception, match=r"backbone\.res"):
        select_modules(plain, cfg.partial.stochastic_depth.blocks)


def test_debug_fast_is_a_run_of_a_few_batches_without_files() -> None:
    cfg = compose_train("debug=fast")
    assert (cfg.trainer.max_epochs, cfg.trainer.limit_train_batches, cfg.pretrain.max_epochs) == (1, 4, 1)
    assert not cfg.logger and not cfg.callbacks
    assert compose_train("debug=fast", "logger=csv").logger.csv  # the command line still wins
