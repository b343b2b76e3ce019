r"""The main job's command line: configuration errors as one line, safe overrides, ``=`` in checkpoint paths.

:func:`run_cli` wraps a ``@hydra.main`` function. It lets Hydra raise instead of printing (so the real
exception can be classified), then:

- a **configuration error** (Hydra/OmegaConf composition errors, errors raised while instantiating configs,
  any :class:`~lit_partial.errors.LitPartialError` in the exception's cause chain, Lightning's
  ``MisconfigurationException``, also when raised in a ``ddp_spawn`` worker) prints ``Error: <one line>`` on
  stderr and exits with :data:`CONFIG_ERROR_EXIT` (2), the same under every strategy;
- any other exception (a bug in a model, an error inside torch) keeps its full traceback (exit 1).

``HYDRA_FULL_ERROR=1`` shows the traceback of configuration errors too. Before Hydra runs anything,
:func:`preflight` checks the ``_target_`` of Hydra's own callbacks, launcher, sweeper and logging handlers
(Hydra builds those before the job starts), and :func:`quote_checkpoint_paths` quotes ``ckpt_path=`` values
with ``=`` in them (Lightning's default checkpoint names), which Hydra's override grammar cannot parse.

Example:
    >>> quote_checkpoint_paths(["ckpt_path=out/epoch=0-step=8.ckpt", "seed=1"])
    ["ckpt_path='out/epoch=0-step=8.ckpt'", 'seed=1']
    >>> one_line(ValueError("a\n  b"))
    'a b'
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lit_partial.app.config import CONF_DIR
from lit_partial.config import DEFAULT_TARGET_ROOTS, _check_roots, iter_targets, resolve_target
from lit_partial.errors import ConfigurationError, LitPartialError

__all__ = [
    "CONFIG_ERROR_EXIT",
    "config_error_message",
    "exception_chain",
    "is_config_error",
    "one_line",
    "preflight",
    "quote_checkpoint_paths",
    "run_cli",
]

#: Exit status of every configuration error (argparse's convention for usage errors); a crash exits with 1.
CONFIG_ERROR_EXIT = 2

_USER_FULL_ERROR = "LIT_PARTIAL_USER_HYDRA_FULL_ERROR"

_HYDRA_CALLBACK_ROOTS = ("hydra.experimental.callbacks", "lit_partial.app.compare")
_LOGGING_ROOTS = ("logging",)


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then its ``__cause__`` / ``__context__``, and so on (each exception once)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _config_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    return (LitPartialError, HydraException, OmegaConfBaseException, MisconfigurationException)


def _spawned_error(exc: BaseException) -> tuple[str, str] | None:
    """``(qualified type, message)`` of the last exception in a ``ddp_spawn`` worker's traceback text, if any."""
    from torch.multiprocessing.spawn import ProcessRaisedException

    if not isinstance(exc, ProcessRaisedException):
        return None
    text = str(exc)
    matches = list(re.finditer(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.*?)(?=\n\n|\Z)", text, re.M | re.S))
    best = None
    for match in matches:  # the worker's chain: prefer a lit_partial error, else the last one
        qualname, message = match.group(1), match.group(2)
        if _named_config_error(qualname):
            best = (qualname, message)
    return best


def _named_config_error(qualname: str) -> bool:
    module_name, _, name = qualname.rpartition(".")
    if module_name.split(".")[0] not in ("lit_partial", "hydra", "omegaconf", "lightning"):
        return False
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, _config_types())


def is_config_error(exc: BaseException) -> bool:
    """True when ``exc`` means "the configuration is wrong" (see the module docstring); False for crashes."""
    types = _config_types()
    return any(isinstance(e, types) or _spawned_error(e) is not None for e in exception_chain(exc))


def one_line(exc: BaseException | str) -> str:
    """The message of ``exc`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(exc).split())


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(node, resolve=False) if isinstance(node, DictConfig) else node
    keys: list[str] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                child_path = f"{path}.{key}" if path else str(key)
                keys.append(child_path)
                walk(child, child_path)

    walk(plain, prefix)
    return keys


def closest_keys(bad_key: str, root: Any) -> list[str]:
    """Up to three keys of ``root`` that ``bad_key`` most likely meant (by full path and by last name).

    Example:
        >>> closest_keys("trainer.max_epoch", {"trainer": {"max_epochs": 3, "min_epochs": 1}, "model": {"lr": 1}})
        ['trainer.max_epochs', 'trainer.min_epochs']
        >>> closest_keys("lr", {"trainer": {"max_epochs": 3}, "model": {"lr": 1}})
        ['model.lr']
    """
    keys = [k for k in _all_keys(root) if k != "hydra" and not k.startswith("hydra.") and "._" not in k]
    by_path = difflib.get_close_matches(bad_key, keys, n=3, cutoff=0.75)
    last = bad_key.rpartition(".")[2]
    by_name = [k for k in keys if k.rpartition(".")[2] in difflib.get_close_matches(last, [last_name(k)], cutoff=0.75)]
    by_name.sort(key=lambda k: (k.rpartition(".")[2] != last, k.count("."), k))
    merged = list(dict.fromkeys([*by_path, *by_name]))
    return merged[:3]


def last_name(key: str) -> str:
    """The last dotted part of ``key``."""
    return key.rpartition(".")[2]


def _presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def config_error_message(exc: BaseException) -> str:
    """One line that names the bad key or value, what was expected and the fix, for a configuration error."""
    from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    chain = list(exception_chain(exc))
    for e in chain:
        spawned = _spawned_error(e)
        if spawned is not None:
            return one_line(spawned[1])
    lit = next((e for e in chain if isinstance(e, LitPartialError)), None)
    inst = next((e for e in chain if isinstance(e, InstantiationException)), None)
    if lit is not None:
        key = re.search(r"full_key: (\S+)", str(inst)) if inst is not None else None
        return one_line(f"{key.group(1)}: {lit}" if key else lit)
    if isinstance(exc, MissingConfigException) or any(isinstance(e, MissingConfigException) for e in chain):
        missing = next(e for e in chain if isinstance(e, MissingConfigException))
        name = getattr(missing, "missing_cfg_file", "") or ""
        group, _, option = str(name).rpartition("/")
        options = getattr(missing, "options", None) or []
        if group and options:
            return f"{group}={option}: there is no such {group} config; choose one of {', '.join(options)}."
        return one_line(missing)
    omega = next((e for e in chain if isinstance(e, OmegaConfBaseException)), None)
    composition = next((e for e in chain if isinstance(e, ConfigCompositionException)), None)
    if omega is not None and composition is not None:
        full_key = getattr(omega, "full_key", None) or ""
        if isinstance(omega, ValidationError):
            override = re.search(r"override (\S+)", str(composition))
            what = override.group(1) if override else full_key
            return one_line(f"{what}: {str(omega).splitlines()[0]} (the type of {full_key} is checked when composing).")
        if isinstance(omega, ConfigKeyError | AttributeError) or "not in" in str(omega):
            return _unknown_key_message(full_key, omega)
    if inst is not None:
        cause = inst.__cause__
        key = re.search(r"full_key: (\S+)", str(inst))
        detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(inst).splitlines()[0]
        return one_line(f"{key.group(1) if key else 'config'}: {detail}")
    return one_line(exc)


def _unknown_key_message(full_key: str, omega: Any) -> str:
    parts = full_key.split(".")
    if len(parts) >= 2 and parts[0] in ("partial", "callbacks", "logger") and parts[1] in _presets(parts[0]):
        group, preset = parts[0], parts[1]
        return (
            f"{full_key} belongs to the {group} preset {preset!r}, which is not selected: add {group}={preset} "
            f"before it (several presets: {group}=[{preset},...])."
        )
    parent = getattr(omega, "parent_node", None)
    root = parent._get_root() if parent is not None else None
    close = closest_keys(full_key, root) if root is not None else []
    hint = f" did you mean {' or '.join(close)}?" if close else ""
    return (
        f"unknown key {full_key!r};{hint} (`lit-partial-train --cfg job` prints every key; "
        "a '+' prefix adds a new key only where the schema allows it)."
    )


def quote_checkpoint_paths(argv: Sequence[str]) -> list[str]:
    """Quote the value of ``ckpt_path=...`` overrides that hold ``=``, so Hydra reads them as one string."""
    out = []
    for arg in argv:
        match = re.fullmatch(r"(\+{0,2}ckpt_path)=(.*)", arg, re.S)
        if match and "=" in match.group(2) and not re.fullmatch(r"(['\"]).*\1", match.group(2), re.S):
            value = match.group(2).replace("\\", "\\\\").replace("'", "\\'")
            arg = f"{match.group(1)}='{value}'"
        out.append(arg)
    return out


def _hydra_targets(hydra_cfg: Any) -> Iterator[tuple[str, Any, tuple[str, ...], str | None, bool]]:
    """(key, target, roots, base, allow_private) of everything Hydra itself builds from its config node."""
    for key, target, depth in iter_targets(hydra_cfg.get("callbacks") or {}, "hydra.callbacks"):
        base = "hydra.experimental.callback.Callback" if depth == 0 and key.count(".") == 2 else None
        yield key, target, _HYDRA_CALLBACK_ROOTS, base, False
    for name in ("launcher", "sweeper"):
        node = hydra_cfg.get(name)
        if node is not None and "_target_" in node:
            base = f"hydra.plugins.{name}.{name.capitalize()}"
            yield f"hydra.{name}", node["_target_"], ("hydra._internal.core_plugins", "hydra_plugins"), base, True
    for name in ("job_logging", "hydra_logging"):
        for key, value in _logging_factories(hydra_cfg.get(name), f"hydra.{name}"):
            yield key, value, _LOGGING_ROOTS, None, False


def _logging_factories(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """The ``class`` / ``()`` entries of a ``logging.config.dictConfig`` tree (dictConfig calls them)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=False)
    if isinstance(node, dict):
        for key in node:
            child = node[key]
            if key in ("class", "()"):
                yield f"{path}.{key}", child
            else:
                yield from _logging_factories(child, f"{path}.{key}")


def preflight(argv: Sequence[str], config_name: str = "train") -> None:
    """Check the targets Hydra builds before the job (its callbacks, launcher, sweeper, logging handlers).

    The overrides are composed once with the Compose API (each sweep at its first value); a composition error is
    left to Hydra's own run, which reports it.

    Raises:
        ConfigurationError: A target outside its allowed roots, not a class, or of the wrong kind.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, _ = get_args_parser().parse_known_args(list(argv))
    if args.help or args.hydra_help or args.shell_completion or args.info:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:
        return
    overrides = []
    for override in parsed:
        if override.is_sweep_override():
            if override.key_or_group.startswith("hydra"):
                raise ConfigurationError(
                    f"{override.input_line}: sweeping over Hydra's own settings is not supported by the main job; "
                    "run one job per value."
                )
            value = next(iter(override.sweep_string_iterator()), None)
            if value is None:
                continue
            overrides.append(f"{override.get_key_element()}={value}")
        elif override.input_line is not None:  # None only for overrides built in code, not parsed
            overrides.append(override.input_line)
    config_dir = args.config_dir or str(CONF_DIR)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name=args.config_name or config_name, overrides=overrides, return_hydra_config=True)
    except Exception:
        return
    finally:
        GlobalHydra.instance().clear()
    extra = tuple(cfg.get("extra_target_roots") or ())
    user_roots = _check_roots(extra)[len(DEFAULT_TARGET_ROOTS) :]
    for key, target, roots, base, private in _hydra_targets(cfg.hydra):
        resolve_target(key, target, (*roots, *user_roots), base, allow_private=private)


def run_cli(
    hydra_main: Callable[[], Any], argv: Sequence[str] | None = None, job_errors: Sequence[BaseException] = ()
) -> None:
    """Run a ``@hydra.main`` function with the main job's error handling (see the module docstring).

    Args:
        hydra_main: The decorated main function.
        argv: The command-line arguments (default ``sys.argv[1:]``).
        job_errors: Filled by the job with the configuration errors it caught (so that Hydra does not print its
            own "Error executing job" banner); the first is reported after Hydra returns.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv[1:] = quote_checkpoint_paths(argv)
    # Hydra raises instead of printing, and we decide how to report; the user's own setting is kept for children
    # (Lightning's `ddp` strategy starts this script again per rank).
    os.environ.setdefault(_USER_FULL_ERROR, os.environ.get("HYDRA_FULL_ERROR", ""))
    show_traceback = os.environ[_USER_FULL_ERROR] == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        preflight(sys.argv[1:])
        hydra_main()
        if job_errors:
            raise job_errors[0]
    except SystemExit:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        if is_config_error(exc) and not show_traceback:
            print(f"Error: {config_error_message(exc)}", file=sys.stderr, flush=True)
            sys.exit(CONFIG_ERROR_EXIT)
        traceback.print_exc()
        sys.exit(1)
