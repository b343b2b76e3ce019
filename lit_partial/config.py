"""Hydra structured configs: the schema the main job's YAML files are checked against.

``register_configs()`` stores ``main_schema`` in Hydra's ConfigStore; ``conf/config.yaml`` lists it first
in its defaults, so every key composed from the YAML files or the command line is checked: an unknown
key or a value of the wrong type (``trainer.max_epochs=abc``) stops with Hydra's error before any code runs.

The trainer schema is generated from ``lightning.Trainer.__init__``, so every Trainer argument is available
as ``trainer.<name>`` with its type, in whatever Lightning version is installed.

Example:
    >>> schema = trainer_schema()
    >>> schema.__dataclass_fields__["max_epochs"].type
    typing.Optional[int]
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

__all__ = ["MainConfig", "PathsConfig", "register_configs", "trainer_schema"]

#: Trainer arguments the main job builds from other config groups (``logger``, ``callbacks``, ``partial``).
_BUILT_ELSEWHERE = {"self", "logger", "callbacks", "plugins"}
#: Trainer arguments that take a name or a strategy object: a ``_target_`` node the main job instantiates.
_NAME_OR_OBJECT = {"strategy"}
_PRIMITIVES = (bool, int, float, str)


def _yaml_type(hint: Any) -> Any:
    """The OmegaConf-checkable type for a Trainer argument's type hint (``Any`` where several types are legal).

    ``Union[float, int]`` stays ``Any``: Lightning reads ``limit_train_batches=1`` (one batch) and ``1.0``
    (all batches) differently, so converting between them would silently change training.
    """
    origin = typing.get_origin(hint)
    if origin not in (typing.Union, types.UnionType):
        return hint if hint in _PRIMITIVES else Any
    args = typing.get_args(hint)
    optional = type(None) in args
    yaml_args = [a for a in args if a in _PRIMITIVES or typing.get_origin(a) in (Literal, list, dict)]
    if len(yaml_args) == 1 and yaml_args[0] in _PRIMITIVES:
        return Optional[yaml_args[0]] if optional else yaml_args[0]  # noqa: UP045 - OmegaConf needs Optional
    return Any


@functools.cache
def trainer_schema() -> type:
    """A dataclass with one typed field per ``lightning.Trainer.__init__`` argument (defaults as in Lightning)."""
    import lightning as L

    hints = typing.get_type_hints(L.Trainer.__init__)
    fields = []
    for name, param in inspect.signature(L.Trainer.__init__).parameters.items():
        if name in _BUILT_ELSEWHERE or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = param.default
        yaml_type = Any if name in _NAME_OR_OBJECT else _yaml_type(hints.get(name, Any))
        if not isinstance(default, (*_PRIMITIVES, type(None))):  # e.g. a timedelta default: not representable
            default, yaml_type = None, Any
        fields.append((name, yaml_type, field(default=default)))
    return dataclasses.make_dataclass("TrainerConfig", fields)


@dataclass
class PathsConfig:
    """Where the job writes: logs, checkpoints and the composed config."""

    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class MainConfig:
    """The main job's top-level schema; the groups (``model``, ``data``, ...) fill the ``Any`` nodes."""

    trainer: Any = None  # replaced by the generated TrainerConfig in register_configs()
    model: Any = None
    data: Any = None
    partial: dict[str, Any] = field(default_factory=dict)
    logger: Any = None
    callbacks: Any = None
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: Optional[int] = 0  # noqa: UP045 - OmegaConf reads typing.Optional, not `int | None`
    ckpt_path: Optional[str] = None  # noqa: UP045


def register_configs() -> None:
    """Store ``main_schema`` (the :class:`MainConfig` with a typed trainer) in Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    schema = dataclasses.make_dataclass(
        "MainConfigSchema",
        [("trainer", trainer_schema(), field(default_factory=trainer_schema()))],
        bases=(MainConfig,),
    )
    ConfigStore.instance().store(name="main_schema", node=schema)
