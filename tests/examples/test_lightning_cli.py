"""LightningCLI (examples/lightning_cli/): every YAML builds the callbacks the same Python code builds, and trains."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback

from lit_partial import (
    LISA,
    ActivationDetach,
    ActivationMemoryMonitor,
    AdaptiveFreezing,
    BAdam,
    ConditionalDetach,
    ConditionalSkip,
    DropBackward,
    GradientMasking,
    LayerFreezing,
    SelectiveBackprop,
    StochasticDepth,
    TokenSelection,
)
from lit_partial.app.config import CONF_DIR
from lit_partial.callbacks.base import Technique
from tests.helpers.cli import lightning_cli_example_main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "lightning_cli"

try:  # LightningCLI needs jsonargparse[signatures] (the `cli` and `test` extras install it)
    from lightning.pytorch.cli import _JSONARGPARSE_SIGNATURES_AVAILABLE
except ImportError:  # pragma: no cover - a Lightning without the flag
    _JSONARGPARSE_SIGNATURES_AVAILABLE = False
if not _JSONARGPARSE_SIGNATURES_AVAILABLE:
    pytest.skip(f"{_JSONARGPARSE_SIGNATURES_AVAILABLE}: pip install -e '.[test]'", allow_module_level=True)


main = lightning_cli_example_main()

PLATEAU = {"plateau": "val_loss", "mode": "min", "patience": 1, "min_delta": 0.01}

#: configs/<name>.yaml -> the callbacks it must build, written in Python.
EXPECTED: dict[str, Callable[[], list[Callback]]] = {
    "layer_freezing": lambda: [
        LayerFreezing(
            frozen="backbone",
            schedule=[{"epoch": 1, "unfreeze": "backbone.2", "lr_scale": 0.1}, {"epoch": 2, "unfreeze": "backbone"}],
            train_bn=False,
        )
    ],
    "unfreeze_on_plateau": lambda: [
        LayerFreezing(
            frozen="backbone",
            schedule=[
                {"when": PLATEAU, "unfreeze": "backbone.2", "lr_scale": 0.1},
                {"when": PLATEAU, "unfreeze": "backbone"},
            ],
        )
    ],
    "gradient_masking": lambda: [
        GradientMasking(
            {
                "head.1.weight": {"kind": "rows", "index": [0, 1]},
                "backbone.*.0.weight": {"kind": "random", "keep": 0.1, "seed": 0},
            },
            strict=True,
        )
    ],
    "conditional_detach": lambda: [
        ConditionalDetach(
            {
                "backbone.0": {"epochs": [0, 1]},
                "features": {"when": "always", "grad_scale": 0.5},
                "backbone.1": {"when": {"metric": "val_acc", "op": ">", "value": 0.95}},
            }
        )
    ],
    "stochastic_depth": lambda: [
        StochasticDepth(blocks="backbone.res.[0-2]", drop_rate=0.2, seed=0),
        ConditionalSkip({"backbone.res.3": {"when": {"steps": [0, 40]}, "per_sample": False}}),
    ],
    "activation_detach": lambda: [
        ActivationDetach(at={"backbone.0": {"epochs": [0, 1]}}, checkpoint=["backbone.1", "backbone.2"]),
        ActivationMemoryMonitor(every_n_steps=1),
    ],
    "selective_backprop": lambda: [SelectiveBackprop(keep=0.25, method="topk", start=0.1)],
    "lisa": lambda: [LISA(layers="backbone.res.*", n_active=1, interval_steps=5, seed=0)],
    "badam": lambda: [
        LayerFreezing(frozen=["backbone.0", "backbone.1", "backbone.2", "head"]),
        BAdam(blocks="backbone.res.*", switch_every=5, order="descending"),
    ],
    "adaptive_freezing": lambda: [AdaptiveFreezing(layers="backbone.res.*", every_n_steps=5, percentile=50)],
    "token_selection": lambda: [TokenSelection(keep=0.6, score="loss", scope="rank")],
    "drop_backward": lambda: [
        DropBackward("model.model.layers.*.self_attn,model.model.layers.*.mlp", rate=0.5, allocation="uniform")
    ],
    "selective_checkpointing": lambda: [ActivationDetach(checkpoint="model.model.layers.*", policy="matmul")],
}

QUICK = [  # a short, quiet run
    "--trainer.max_steps=3",
    "--trainer.limit_val_batches=2",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def techniques(callbacks: list[Any]) -> list[Technique]:
    return [cb for cb in callbacks if isinstance(cb, Technique)]


def test_every_config_is_listed() -> None:
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_builds_the_callbacks_python_builds(name: str) -> None:
    cli = main(["--config", str(CONFIGS / f"{name}.yaml"), *QUICK], run=False)
    built, expected = techniques(cli.trainer.callbacks), EXPECTED[name]()
    assert [type(cb) for cb in built] == [type(cb) for cb in expected]
    for got, want in zip(built, expected, strict=True):
        assert got.config() == want.config()
        assert got.state_key == want.state_key


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_trains(name: str, tmp_path: Path) -> None:
    cli = main(["fit", "--config", str(CONFIGS / f"{name}.yaml"), *QUICK, f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 3
    if name == "layer_freezing":  # LightningCLI built the optimizer; LayerFreezing still gave lr_scale its group
        groups = cli.trainer.optimizers[0].param_groups
        assert [g.get("name") for g in groups] == [None, "unfreeze@epoch1"]
        assert groups[1]["lr"] == pytest.approx(0.003 * 0.1)


def test_a_mask_builder_spec_stays_a_mapping() -> None:
    # The bug this guards against: `str` first in the annotation turned the spec into its repr, and the user got
    # "mask file does not exist".
    cli = main(["--config", str(CONFIGS / "gradient_masking.yaml"), *QUICK], run=False)
    masking = techniques(cli.trainer.callbacks)[0]
    assert masking.config()["masks"]["head.1.weight"] == {"kind": "rows", "index": [0, 1]}


def test_hydra_plateau_preset_builds_the_same_callback() -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    preset = OmegaConf.load(CONF_DIR / "partial" / "unfreeze_on_plateau.yaml")
    built = instantiate(preset.unfreeze_on_plateau)
    (want,) = EXPECTED["unfreeze_on_plateau"]()
    assert built.config() == want.config()
