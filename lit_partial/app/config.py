"""The main job's schema: what ``conf/train.yaml`` and every file it composes are held to.

:func:`register_configs` stores ``train_schema`` in Hydra's ConfigStore; ``conf/train.yaml`` lists it first in
its defaults, so every key composed from the YAML files or the command line is checked: an unknown key or a value
of the wrong type (``trainer.max_epochs=abc``, ``model.lr=abc``) stops before any code runs. The trainer schema is
generated from ``lightning.Trainer.__init__``, and the model and data schemas from the demo classes' constructors
(:func:`lit_partial.config.constructor_schema`, stored as ``schema/model/<Class>`` and ``schema/data/<Class>``,
which ``conf/model/*.yaml`` and ``conf/data/*.yaml`` extend).

Example:
    >>> register_configs()
    >>> from hydra import compose, initialize_config_dir
    >>> with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    ...     cfg = compose("train", overrides=["paths.output_dir=/tmp/x", "trainer.max_epochs=2"])
    >>> cfg.trainer.max_epochs, cfg.model.num_classes, cfg.pretrain.transfer
    (2, 5, 'backbone')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from lit_partial.config import constructor_schema, trainer_schema
from lit_partial.demos import ByteLM, DigitsClassifier, DigitsDataModule, DigitsRNN, TextDataModule

__all__ = [
    "CONF_DIR",
    "CostsConfig",
    "MainConfig",
    "PathsConfig",
    "PretrainConfig",
    "TrainConfig",
    "register_configs",
]

#: The main job's config tree (package data: shipped in the wheel).
CONF_DIR = Path(__file__).resolve().parent / "conf"


@dataclass
class PretrainConfig:
    """The transfer-learning job's first stage: train the model on other classes and keep its backbone."""

    enabled: bool = True
    classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    max_epochs: int = 6
    batch_size: int = 64
    transfer: str = "backbone"
    cache_dir: str = "outputs/pretrained"
    force: bool = False
    # Settings of the pretraining stage in place of the fine-tuning ones (the LLM job: data {domain: code},
    # model {lora_rank: 0}); a non-empty `data` replaces `classes` (no class overlap check, no relabelling).
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


@dataclass
class CostsConfig:
    """What the main job measures for the comparison report (``costs.json`` in the run folder)."""

    enabled: bool = True
    every_n_steps: int = 2


@dataclass
class PathsConfig:
    """Where the job writes: logs, checkpoints and the composed config."""

    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrainConfig:
    """The main job's top-level schema; the groups (``model``, ``data``, ...) fill the ``Any`` nodes."""

    trainer: Any = None  # replaced by the generated TrainerConfig in register_configs()
    model: Any = None
    data: Any = None
    partial: dict[str, Any] = field(default_factory=dict)
    logger: Any = None
    callbacks: Any = None
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    costs: CostsConfig = field(default_factory=CostsConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: Optional[int] = 0  # noqa: UP045 - OmegaConf reads typing.Optional, not `int | None`
    ckpt_path: Optional[str] = None  # noqa: UP045
    extra_target_roots: list[str] = field(default_factory=list)


#: The name the schema had when the job lived in ``scripts/`` (``lit_partial.config.MainConfig``).
MainConfig = TrainConfig


def _num_classes(classes: Any) -> int:
    """``${num_classes:${data.classes}}``: 10 for all digits (``null``), else how many are listed."""
    return 10 if classes is None else len(classes)


def register_configs() -> None:
    """Store ``train_schema`` and the model/data schemas in Hydra's ConfigStore; register ``${num_classes:...}``.

    The schema is also stored as ``main_schema``, its name before ``config.yaml`` became ``train.yaml``, so a
    copied config tree that lists ``main_schema`` in its defaults still composes.
    """
    schema = dataclasses.make_dataclass(
        "TrainConfigSchema",
        [("trainer", trainer_schema(), field(default_factory=trainer_schema()))],
        bases=(TrainConfig,),
    )
    store = ConfigStore.instance()
    for name in ("train_schema", "main_schema"):
        store.store(name=name, node=schema)
    models, datas = (DigitsClassifier, DigitsRNN, ByteLM), (DigitsDataModule, TextDataModule)
    for group, classes in (("model", models), ("data", datas)):
        for cls in classes:
            store.store(group=f"schema/{group}", name=cls.__name__, node=constructor_schema(cls))
    if not OmegaConf.has_resolver("num_classes"):
        OmegaConf.register_new_resolver("num_classes", _num_classes)
