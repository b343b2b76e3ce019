"""Generic Hydra helpers: typed schemas generated from constructors, and safe ``_target_`` checks.

:func:`trainer_schema` generates a dataclass from ``lightning.Trainer.__init__`` and :func:`constructor_schema`
one from any class's constructor, so that a YAML file extending them is type-checked when composed: an unknown
key or a value of the wrong type (``trainer.max_epochs=abc``, ``model.lr=abc``) stops before any code runs, in
whatever version of the class is installed. The main job stores them in Hydra's ConfigStore
(:func:`lit_partial.app.config.register_configs`); any Hydra application can do the same.

:func:`check_targets` resolves every ``_target_`` of a composed config (nested ones included) *without
calling anything*, from an allowlist of import roots, and checks that it is a class of the kind its group
builds; :func:`instantiate` is only called afterwards.

Example:
    >>> schema = trainer_schema()
    >>> schema.__dataclass_fields__["max_epochs"].type
    typing.Optional[int]
    >>> from omegaconf import OmegaConf
    >>> check_targets(OmegaConf.create({"partial": {"x": {"_target_": "torch.load", "f": "a.pt"}}}))
    Traceback (most recent call last):
    ...
    lit_partial.errors.ConfigurationError: partial.x._target_='torch.load' is not allowed: ...
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import field
from typing import Any, Literal, Optional

from lit_partial.errors import ConfigurationError

__all__ = [
    "DEFAULT_TARGET_ROOTS",
    "GROUP_BASES",
    "check_targets",
    "constructor_schema",
    "iter_targets",
    "resolve_target",
    "trainer_schema",
]

#: Trainer arguments the main job builds from other config groups (``logger``, ``callbacks``, ``partial``).
_BUILT_ELSEWHERE = {"self", "logger", "callbacks", "plugins"}
#: Trainer arguments that take a name or a strategy object: a ``_target_`` node the main job instantiates.
_NAME_OR_OBJECT = {"strategy"}
_PRIMITIVES = (bool, int, float, str)


def _list_type(hint: Any) -> Any:
    """``list[int]`` for ``Sequence[int]`` / ``list[int]`` / ``tuple[int, ...]`` hints of a primitive, else None."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (list, tuple, Sequence) and args and args[0] in _PRIMITIVES and args[1:] in ((), (Ellipsis,)):
        return list[args[0]]  # type: ignore[valid-type]  # built at runtime
    return None


def _yaml_type(hint: Any) -> Any:
    """The OmegaConf-checkable type for a constructor argument's type hint (``Any`` where several types are legal).

    ``Union[float, int]`` stays ``Any``: Lightning reads ``limit_train_batches=1`` (one batch) and ``1.0``
    (all batches) differently, so converting between them would silently change training.
    """
    origin = typing.get_origin(hint)
    if origin not in (typing.Union, types.UnionType):
        return hint if hint in _PRIMITIVES else (_list_type(hint) or Any)
    args = typing.get_args(hint)
    optional = type(None) in args
    yaml_args = [a for a in args if a in _PRIMITIVES or typing.get_origin(a) in (Literal, list, dict)]
    if len(yaml_args) == 1 and yaml_args[0] in _PRIMITIVES:
        return Optional[yaml_args[0]] if optional else yaml_args[0]  # noqa: UP045 - OmegaConf needs Optional
    lists = [_list_type(a) for a in args if a is not type(None)]
    if len(lists) == 1 and lists[0] is not None:
        return Optional[lists[0]] if optional else lists[0]  # noqa: UP045
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


def _target_path(cls: type) -> str:
    """The public import path of ``cls``: ``lit_partial.demos.DigitsClassifier`` rather than its defining module."""
    for module_name in (cls.__module__.rpartition(".")[0], cls.__module__):
        if module_name and getattr(importlib.import_module(module_name), cls.__name__, None) is cls:
            return f"{module_name}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"  # pragma: no cover - every class we register has a public path


@functools.cache
def constructor_schema(cls: type) -> type:
    """A dataclass with ``_target_`` and one typed field per argument of ``cls.__init__`` (defaults as in ``cls``).

    Composing a YAML file that extends it type-checks every key: ``model.lr=abc`` stops with
    "could not be converted to Float" naming ``model.lr``, and an unknown key lists the valid ones.

    Example:
        >>> from lit_partial.demos import DigitsClassifier
        >>> fields = constructor_schema(DigitsClassifier).__dataclass_fields__
        >>> fields["lr"].type, fields["channels"].type, fields["_target_"].default
        (<class 'float'>, list[int], 'lit_partial.demos.DigitsClassifier')
    """
    init = vars(cls).get("__init__") or cls.__init__  # type: ignore[misc]  # the class's own constructor
    hints = typing.get_type_hints(init)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default=_target_path(cls)))]
    for name, param in inspect.signature(init).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        yaml_type = _yaml_type(hints.get(name, Any))
        default = param.default
        if default is param.empty:
            fields.append((name, yaml_type, field(default=dataclasses.MISSING)))
        elif isinstance(default, tuple | list):
            fields.append((name, yaml_type, field(default_factory=functools.partial(list, default))))
        elif isinstance(default, (*_PRIMITIVES, type(None))):
            fields.append((name, yaml_type, field(default=default)))
        else:
            fields.append((name, Any, field(default=None)))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


# ----------------------------------------------------------------------------------------------------------------
# Safe `_target_`s: resolve and check every target before anything is called.

#: Import roots every ``_target_`` may come from; a config adds its own with ``extra_target_roots: [my_pkg]``.
DEFAULT_TARGET_ROOTS: tuple[str, ...] = (
    "lit_partial",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.strategies",
    "torch.optim",  # optimizers and torch.optim.lr_scheduler
)

#: Roots too broad to add (they reach functions that load pickles, write files or run programs).
_UNSAFE_ROOTS: tuple[str, ...] = ("builtins", "os", "sys", "subprocess", "shutil", "pickle", "marshal", "importlib")
_UNSAFE_ROOTS += ("runpy", "io", "pathlib", "ctypes", "socket", "code", "torch.hub", "torch.serialization", "hydra")
_UNSAFE_ROOTS += ("numpy.lib",)
_TOO_BROAD = ("torch", "numpy", "lightning", "lightning.pytorch", "lightning.fabric")

#: What a ``_target_`` directly under each group must build (by import path, so nothing is imported early).
GROUP_BASES: dict[str, str] = {
    "model": "lightning.pytorch.LightningModule",
    "data": "lightning.pytorch.LightningDataModule",
    "partial.*": "lightning.pytorch.callbacks.Callback",
    "callbacks.*": "lightning.pytorch.callbacks.Callback",
    "logger.*": "lightning.pytorch.loggers.Logger",
    "trainer.strategy": "lightning.pytorch.strategies.Strategy",
}

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def iter_targets(node: Any, path: str = "") -> Iterator[tuple[str, Any, int]]:
    """Every ``(key path, _target_ value, depth)`` in a config tree, nested lists and dicts included.

    ``depth`` counts the ``_target_`` nodes above this one (0: not inside another target).

    Example:
        >>> cfg = {"model": {"_target_": "a.B", "opt": {"_target_": "c.D"}}, "xs": [{"_target_": "e.F"}]}
        >>> list(iter_targets(cfg))
        [('model', 'a.B', 0), ('model.opt', 'c.D', 1), ('xs.0', 'e.F', 0)]
    """
    yield from _iter_targets(node, path, 0)


def _iter_targets(node: Any, path: str, depth: int) -> Iterator[tuple[str, Any, int]]:
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, Mapping | DictConfig):
        keys = list(node.keys())
        inner = depth
        if "_target_" in keys:
            yield path, _raw(node, "_target_"), depth
            inner = depth + 1
        for key in keys:
            if key != "_target_":
                yield from _iter_targets(_raw(node, key), f"{path}.{key}" if path else str(key), inner)
    elif isinstance(node, list | tuple | ListConfig):
        for i, item in enumerate(node):
            yield from _iter_targets(item, f"{path}.{i}" if path else str(i), depth)


def _raw(node: Any, key: Any) -> Any:
    """``node[key]`` with interpolations resolved where they can be (a broken one is left for Hydra to report)."""
    try:
        return node[key]
    except Exception:
        return None


def _check_roots(extra_roots: Sequence[str]) -> tuple[str, ...]:
    roots = []
    for root in extra_roots:
        if not isinstance(root, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", root):
            raise ConfigurationError(
                f"extra_target_roots: {root!r} is not a module path; give packages like [my_project.models]."
            )
        unsafe = root in _TOO_BROAD or any(root == u or root.startswith(u + ".") for u in _UNSAFE_ROOTS)
        if unsafe:
            raise ConfigurationError(
                f"extra_target_roots: {root!r} is refused: it is too broad or reaches functions that load pickles, "
                "write files or run programs; add only the package that holds your classes, e.g. [my_project.models]."
            )
        roots.append(root)
    return (*DEFAULT_TARGET_ROOTS, *roots)


def _import_object(target: str) -> Any:
    """Import the longest module prefix of ``target`` and get the remaining attributes (nothing is called)."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ImportError:
            continue
        for i, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                names = [n for n in dir(obj) if not n.startswith("_")]
                close = difflib.get_close_matches(attr, names, n=3)
                hint = f"; did you mean {', '.join('.'.join([*parts[:i], c]) for c in close)}?" if close else ""
                raise ConfigurationError(f"{'.'.join(parts[:i])} has no attribute {attr!r}{hint}")
            obj = getattr(obj, attr)
        return obj
    raise ConfigurationError(f"no module of {target!r} can be imported")


def resolve_target(
    key: str,
    target: Any,
    roots: Sequence[str] = DEFAULT_TARGET_ROOTS,
    base: str | None = None,
    allow_private: bool = False,
) -> type:
    """Resolve one ``_target_`` to a class without calling anything, or raise naming the key.

    Args:
        key: Where the target sits (``partial.freeze_backbone``), for the message.
        target: The ``_target_`` value.
        roots: Import roots the target may come from.
        base: Import path of the class the target must subclass (see :data:`GROUP_BASES`), or ``None``.
        allow_private: Accept parts starting with ``_`` (Hydra's own plugins live in ``hydra._internal``).

    Raises:
        ConfigurationError: The target is not a dotted path, has a private part, lies outside ``roots``, cannot
            be imported, is not a class (functions such as ``torch.load`` never are), or is not a ``base``.

    Example:
        >>> resolve_target("optimizer", "torch.optim.SGD").__name__
        'SGD'
    """
    where = f"{key}._target_={target!r}" if key else f"_target_={target!r}"
    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        raise ConfigurationError(f"{where} must be a dotted import path of a class, e.g. lit_partial.LayerFreezing.")
    if not any(target == r or target.startswith(r + ".") for r in roots):
        raise ConfigurationError(
            f"{where} is not allowed: targets must come from {', '.join(roots)}. To build your own classes, "
            "add their package explicitly: +extra_target_roots=[my_project.models]."
        )
    if not allow_private and any(part.startswith("_") for part in target.split(".")):
        raise ConfigurationError(f"{where} is not allowed: private names (starting with '_') cannot be targets.")
    try:
        obj = _import_object(target)
    except ConfigurationError as err:
        raise ConfigurationError(f"{where} cannot be resolved: {err}.") from None
    if not inspect.isclass(obj):
        raise ConfigurationError(
            f"{where} is a {type(obj).__name__}, not a class: configs may only construct objects "
            "(callbacks, loggers, models, optimizers), never call functions."
        )
    if base is not None:
        base_cls = _import_object(base)
        if not issubclass(obj, base_cls):
            raise ConfigurationError(
                f"{where} is a {obj.__name__}, but {key} must be a {base_cls.__name__} ({base}); "
                f"e.g. {_group_example(key)}."
            )
    return obj


def _group_example(key: str) -> str:
    group = key.split(".")[0]
    return {
        "model": "lit_partial.demos.DigitsClassifier",
        "data": "lit_partial.demos.DigitsDataModule",
        "partial": "lit_partial.LayerFreezing",
        "callbacks": "lightning.pytorch.callbacks.ModelCheckpoint",
        "logger": "lightning.pytorch.loggers.CSVLogger",
        "trainer": "lightning.pytorch.strategies.DDPStrategy",
    }.get(group, "lit_partial.LayerFreezing")


def _expected_base(key: str) -> str | None:
    parts = key.split(".")
    for pattern, base in GROUP_BASES.items():
        want = pattern.split(".")
        if len(want) == len(parts) and all(w in ("*", p) for w, p in zip(want, parts, strict=True)):
            return base
    return None


def check_targets(cfg: Any, extra_roots: Sequence[str] = (), groups: Sequence[str] | None = None) -> dict[str, type]:
    """Resolve and check every ``_target_`` in ``cfg`` before anything is instantiated.

    Targets directly under a group (``model``, ``data``, ``partial.<name>``, ``callbacks.<name>``,
    ``logger.<name>``, ``trainer.strategy``) must subclass what the group builds (:data:`GROUP_BASES`);
    every target, nested ones included, must be a class under :data:`DEFAULT_TARGET_ROOTS` or ``extra_roots``.
    ``_partial_: true`` is refused directly under a group (it would hand over a function, not an object).

    Args:
        cfg: A composed config (``DictConfig`` or plain dict).
        extra_roots: Import roots the user added (``extra_target_roots``); too broad ones are refused.
        groups: Only check these top-level keys (default: the whole config).

    Returns:
        ``{key path: class}`` of every target.

    Raises:
        ConfigurationError: Naming the first offending key, the target and the fix.
    """
    roots = _check_roots(extra_roots)
    found: dict[str, type] = {}
    for key, target, depth in iter_targets(cfg):
        if groups is not None and key.split(".")[0] not in groups:
            continue
        base = _expected_base(key) if depth == 0 else None
        found[key] = resolve_target(key, target, roots, base)
        if base is not None and _is_partial(cfg, key):
            raise ConfigurationError(f"{key}._partial_=true is not allowed: {key} must build an object; remove it.")
    return found


def _is_partial(cfg: Any, key: str) -> bool:
    node = cfg
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list | tuple) else node[part]
    return bool(node.get("_partial_", False)) if hasattr(node, "get") else False
