"""``lit_partial.examples`` (the demos' old name) still works, warns naming ``lit_partial.demos``, and is the same."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lit_partial import demos
from lit_partial.config import check_targets


def fresh_import(name: str) -> ModuleType:
    """Import ``name`` as a first import would (the alias warns when it is first imported)."""
    for key in [k for k in sys.modules if k == "lit_partial.examples" or k.startswith("lit_partial.examples.")]:
        del sys.modules[key]
    return importlib.import_module(name)


def test_importing_the_old_name_warns_naming_the_new_one() -> None:
    with pytest.warns(DeprecationWarning, match=r"lit_partial.examples is deprecated.*import lit_partial.demos"):
        examples = fresh_import("lit_partial.examples")
    assert examples.__all__ == demos.__all__
    assert all(getattr(examples, name) is getattr(demos, name) for name in demos.__all__)


def test_the_old_submodules_are_the_demos_modules() -> None:
    with pytest.warns(DeprecationWarning, match=r"lit_partial.demos"):
        models = fresh_import("lit_partial.examples.models")
    assert models is demos.models
    from lit_partial.examples.digits import DigitsClassifier  # the form old code uses

    assert DigitsClassifier is demos.DigitsClassifier


def test_old_config_targets_resolve_and_build_the_demo_classes() -> None:
    cfg = OmegaConf.create(
        {
            "model": {"_target_": "lit_partial.examples.DigitsClassifier", "lr": 0.01},
            "data": {"_target_": "lit_partial.examples.DigitsDataModule"},
        }
    )
    with pytest.warns(DeprecationWarning, match=r"lit_partial.demos"):
        fresh_import("lit_partial.examples")
    found = check_targets(cfg)
    assert found == {"model": demos.DigitsClassifier, "data": demos.DigitsDataModule}
    model = instantiate(cfg.model)
    assert type(model) is demos.DigitsClassifier and model.hparams.lr == 0.01
