"""The schedule of :class:`~lit_partial.LayerFreezing`: validated entries and the two ready-made recipes.

An entry is a plain dict, so a schedule can live in YAML::

    {"epoch": 2, "unfreeze": "backbone.3", "lr_scale": 0.1}   # at the start of epoch 2
    {"step": 500, "freeze": "encoder.0"}                      # before optimizer step 500
    {"when": {"plateau": "val_loss", "patience": 2}, "unfreeze": "backbone"}  # at the first epoch start where
                                                              # it holds, once every entry before it has applied

Example:
    >>> [e.describe() for e in parse_schedule([{"epoch": 1, "unfreeze": "backbone", "lr_scale": 0.1}])]
    ['epoch 1: unfreeze backbone (lr_scale 0.1)']
    >>> parse_schedule([{"when": {"plateau": "val_loss", "patience": 2}, "unfreeze": "backbone"}])[0].describe()
    'when val_loss plateaus (min, patience 2): unfreeze backbone'
    >>> [e["epoch"] for e in gradual_unfreezing_schedule(["b.0", "b.1", "b.2"], every_n_epochs=2)]
    [2, 4, 6]
    >>> progressive_freezing_schedule(["b.0", "b.1", "b.2"], total=100, t0=0.5)
    [{'step': 50, 'freeze': 'b.0'}, {'step': 75, 'freeze': 'b.1'}]
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lit_partial._plain import to_plain
from lit_partial.conditions import Condition, parse_condition
from lit_partial.errors import ConditionError, ConfigurationError
from lit_partial.selection import as_selector_list

__all__ = [
    "ScheduleEntry",
    "callback_yaml",
    "entry_spec",
    "gradual_unfreezing_schedule",
    "group_names",
    "parse_schedule",
    "plan_phase_groups",
    "progressive_freezing_schedule",
]

_KEYS = ("epoch", "step", "when", "unfreeze", "freeze", "lr_scale")
_KINDS = ("epoch", "step", "when")
_EXAMPLE = "{'epoch': 2, 'unfreeze': 'backbone', 'lr_scale': 0.1}"


@dataclass(frozen=True)
class ScheduleEntry:
    """One validated schedule point.

    Attributes:
        kind: ``"epoch"`` (applied at the start of that epoch), ``"step"`` (before that optimizer step) or
            ``"when"`` (at the first epoch start where :attr:`when` holds, once every earlier entry has applied).
        point: The epoch or global step (optimizer steps, as ``trainer.global_step`` counts them); for ``"when"``
            entries the entry's position in the schedule.
        unfreeze: Selectors made trainable at this point (empty if none).
        freeze: Selectors frozen at this point (empty if none); applied after ``unfreeze``.
        lr_scale: Learning-rate factor of the parameter group planned for what this entry unfreezes.
        when: The condition of a ``"when"`` entry (None for the others).
    """

    kind: str
    point: int
    unfreeze: tuple[str, ...]
    freeze: tuple[str, ...]
    lr_scale: float
    when: Condition | None = None

    def describe(self) -> str:
        """A one-line human description, used in log lines."""
        parts = [f"unfreeze {', '.join(self.unfreeze)}" if self.unfreeze else ""]
        parts.append(f"freeze {', '.join(self.freeze)}" if self.freeze else "")
        scale = f" (lr_scale {self.lr_scale:.3g})" if self.lr_scale != 1.0 else ""
        when = f"when {self.when.describe()}" if self.when is not None else f"{self.kind} {self.point}"
        return f"{when}: " + "; ".join(p for p in parts if p) + scale

    @property
    def group_name(self) -> str:
        """The base name of the parameter group of what this entry unfreezes (see :func:`group_names`)."""
        return f"unfreeze@{self.kind}{self.point}"


def group_names(entries: Sequence[ScheduleEntry]) -> list[str | None]:
    """The parameter-group name of each entry that unfreezes something (None for the others), all distinct.

    An entry's group is ``unfreeze@<kind><point>`` (``unfreeze@epoch1``, ``unfreeze@step500``, ``unfreeze@when2``);
    entries sharing a point add their selectors (``unfreeze@epoch1[a]``, ``unfreeze@epoch1[b,c]``), and entries that
    also share their selectors their schedule index (``unfreeze@epoch1[a]#3``). Names depend on the schedule alone,
    so a resumed run (same schedule) finds the same names; LearningRateMonitor logs ``lr-<Optimizer>/<name>``.

    Example:
        >>> entries = parse_schedule([{"epoch": 1, "unfreeze": "a"}, {"epoch": 1, "unfreeze": ["b", "c"]},
        ...                           {"epoch": 2, "unfreeze": "d"}, {"epoch": 3, "freeze": "d"}])
        >>> group_names(entries)
        ['unfreeze@epoch1[a]', 'unfreeze@epoch1[b,c]', 'unfreeze@epoch2', None]
    """
    base = [entry.group_name if entry.unfreeze else None for entry in entries]
    shared = Counter(name for name in base if name is not None)
    names = [
        name if name is None or shared[name] == 1 else f"{name}[{','.join(entry.unfreeze)}]"
        for entry, name in zip(entries, base, strict=True)
    ]
    still = Counter(name for name in names if name is not None)
    return [name if name is None or still[name] == 1 else f"{name}#{i}" for i, name in enumerate(names)]


def _when(where: str, spec: Any) -> Condition:
    cond = parse_condition(spec)
    if cond.needs_activation:
        raise ConditionError(
            f"{where}['when'] = {spec!r} reads an activation statistic, which a schedule cannot see (it is decided at "
            "epoch starts, outside forward). Use a metric condition such as {'plateau': 'val_loss', 'patience': 2} "
            "or {'metric': 'val_acc', 'op': '>', 'value': 0.9}."
        )
    return cond


def _entry(index: int, raw: Any) -> ScheduleEntry:
    raw = to_plain(raw)
    where = f"schedule[{index}]"
    if not isinstance(raw, Mapping):
        raise ConfigurationError(f"{where} is {raw!r}; every schedule entry must be a dict such as {_EXAMPLE}.")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigurationError(
            f"{where} has unknown keys {unknown}; allowed keys are {list(_KEYS)}, e.g. {_EXAMPLE}."
        )
    kinds = [k for k in _KINDS if k in raw]
    if len(kinds) != 1:
        found = f"both {' and '.join(repr(k) for k in kinds)}" if kinds else "neither of 'epoch', 'step' nor 'when'"
        raise ConfigurationError(f"{where} = {dict(raw)!r} has {found}; give exactly one of them, e.g. {_EXAMPLE}.")
    kind = kinds[0]
    when = _when(where, raw["when"]) if kind == "when" else None
    point = index if kind == "when" else raw[kind]
    if isinstance(point, bool) or not isinstance(point, numbers.Integral):
        raise ConfigurationError(f"{where}['{kind}'] is {point!r}; expected a non-negative integer such as 2.")
    if point < 0:
        raise ConfigurationError(f"{where}['{kind}'] is {point}; expected a non-negative integer (0 = the very start).")
    if "unfreeze" not in raw and "freeze" not in raw:
        raise ConfigurationError(
            f"{where} = {dict(raw)!r} neither unfreezes nor freezes; add 'unfreeze' and/or 'freeze'."
        )
    unfreeze = tuple(as_selector_list(raw["unfreeze"], argument=f"{where}['unfreeze']")) if "unfreeze" in raw else ()
    freeze = tuple(as_selector_list(raw["freeze"], argument=f"{where}['freeze']")) if "freeze" in raw else ()
    lr_scale = raw.get("lr_scale", 1.0)
    if isinstance(lr_scale, bool) or not isinstance(lr_scale, numbers.Real) or not float(lr_scale) > 0:
        raise ConfigurationError(f"{where}['lr_scale'] is {lr_scale!r}; expected a positive number such as 0.1.")
    if "lr_scale" in raw and not unfreeze:
        raise ConfigurationError(
            f"{where} has 'lr_scale' but unfreezes nothing; lr_scale applies to what an entry unfreezes."
        )
    return ScheduleEntry(kind, int(point), unfreeze, freeze, float(lr_scale), when)


def parse_schedule(schedule: Any) -> list[ScheduleEntry]:
    """Validate a schedule (a list of entry dicts) into :class:`ScheduleEntry` objects, in the given order.

    Raises:
        ValueError: Naming the bad entry, what was expected and an example.
    """
    schedule = to_plain(schedule)
    if schedule is None:
        return []
    if isinstance(schedule, Mapping | str) or not isinstance(schedule, Sequence):
        raise ConfigurationError(f"`schedule` is {schedule!r}; expected a list of dicts such as [{_EXAMPLE}].")
    entries = [_entry(i, raw) for i, raw in enumerate(schedule)]
    for kind in ("epoch", "step"):
        points = [e.point for e in entries if e.kind == kind]
        if points != sorted(points):
            raise ConfigurationError(
                f"`schedule` lists {kind} points {points} out of order; sort the {kind} entries so they apply in "
                "the order written (the order decides what a later entry finds frozen)."
            )
    return entries


def gradual_unfreezing_schedule(
    blocks: Sequence[str | Sequence[str]],
    every_n_epochs: int = 1,
    start_epoch: int | None = None,
    lr_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """ULMFiT-style gradual unfreezing: one more block from the top every ``every_n_epochs`` epochs.

    Args:
        blocks: Block selectors ordered from the bottom (input side) to the top (output side); an item may be a
            list of selectors unfrozen together (e.g. the embeddings below the first block).
        every_n_epochs: Epochs between two unfreezes.
        start_epoch: Epoch of the first unfreeze (default ``every_n_epochs``: the head trains alone first).
        lr_decay: Discriminative fine-tuning: each block learns ``lr_decay`` times slower than the block above
            it (ULMFiT uses 2.6); the top block gets ``lr_scale = 1 / lr_decay``. 1 disables it.

    Returns:
        Schedule entries (plain dicts) for :class:`~lit_partial.LayerFreezing`.
    """
    if not blocks or isinstance(blocks, str):
        raise ConfigurationError(
            f"`blocks` is {blocks!r}; expected a list of block selectors, bottom first, e.g. ['b.0', 'b.1']."
        )
    if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
        raise ConfigurationError(f"`every_n_epochs` is {every_n_epochs!r}; expected a positive integer such as 1.")
    if not lr_decay >= 1.0:
        raise ConfigurationError(f"`lr_decay` is {lr_decay!r}; expected a number >= 1 (2.6 in ULMFiT, 1 = same lr).")
    start = every_n_epochs if start_epoch is None else start_epoch
    entries: list[dict[str, Any]] = []
    for depth, block in enumerate(reversed(list(blocks))):
        group = block if isinstance(block, str) or len(block) != 1 else block[0]
        entry: dict[str, Any] = {"epoch": start + depth * every_n_epochs, "unfreeze": group}
        if lr_decay != 1.0:
            entry["lr_scale"] = lr_decay ** -(depth + 1)
        entries.append(entry)
    return entries


def entry_spec(entry: ScheduleEntry, when: Any = None) -> dict[str, Any]:
    """``entry`` as the plain dict that parses back to it (``when``: the condition as written, for ``when`` entries).

    Example:
        >>> entry_spec(parse_schedule([{"epoch": 2, "unfreeze": ["a"], "lr_scale": 0.5}])[0])
        {'epoch': 2, 'unfreeze': 'a', 'lr_scale': 0.5}
    """
    spec: dict[str, Any] = {"when": when} if entry.kind == "when" else {entry.kind: entry.point}
    for key, selectors in (("unfreeze", entry.unfreeze), ("freeze", entry.freeze)):
        if selectors:
            spec[key] = selectors[0] if len(selectors) == 1 else list(selectors)
    if entry.lr_scale != 1.0:
        spec["lr_scale"] = entry.lr_scale
    return spec


def callback_yaml(target: str, arguments: dict[str, Any], style: str = "hydra", name: str = "callback") -> str:
    """A callback's constructor arguments as YAML, for a Hydra preset or a LightningCLI ``trainer.callbacks`` item.

    ``style="hydra"``: ``name:`` holding ``_target_`` and the arguments (a ``conf/partial/*.yaml`` preset);
    ``style="lightning_cli"``: a list item with ``class_path`` and ``init_args``. Entries of lists of scalars and
    mappings of scalars are written inline, as in the presets; floats in full, so the YAML parses back equal.

    Example:
        >>> print(callback_yaml("lit_partial.LayerFreezing", {"frozen": ["a"], "train_bn": False}, name="freeze"))
        freeze:
          _target_: lit_partial.LayerFreezing
          frozen: [a]
          train_bn: false
        <BLANKLINE>
    """
    import yaml  # type: ignore[import-untyped]  # PyYAML (a hydra-core and lightning dependency) has no stubs

    if style == "hydra":
        document: Any = {name: {"_target_": target, **arguments}}
    elif style == "lightning_cli":
        document = [{"class_path": target, "init_args": arguments}]
    else:
        raise ConfigurationError(f"`style` is {style!r}; expected 'hydra' (a partial= preset) or 'lightning_cli'.")
    return str(yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=120))


def progressive_freezing_schedule(
    blocks: Sequence[str], total: int, t0: float = 0.5, unit: str = "step"
) -> list[dict[str, Any]]:
    """FreezeOut-style progressive freezing: block ``i`` of ``N`` freezes at ``t_i = t0 + (1 - t0) * i / (N - 1)``.

    Training progress is linear in ``unit`` (``"step"`` or ``"epoch"``) up to ``total``. The top block's
    ``t`` is 1, the end of training, so it never freezes; blocks freeze from the bottom up, and each frozen
    prefix needs no backward at all.

    Args:
        blocks: Block selectors ordered from the bottom (input side) to the top.
        total: Training length in ``unit`` (e.g. ``trainer.estimated_stepping_batches``).
        t0: Fraction of training after which the bottom block freezes.
        unit: ``"step"`` or ``"epoch"``.
    """
    if not blocks or isinstance(blocks, str):
        raise ConfigurationError(
            f"`blocks` is {blocks!r}; expected a list of block selectors, bottom first, e.g. ['b.0', 'b.1']."
        )
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ConfigurationError(f"`total` is {total!r}; expected the positive number of training {unit}s.")
    if not 0.0 <= t0 <= 1.0:
        raise ConfigurationError(f"`t0` is {t0!r}; expected a fraction of training in [0, 1], e.g. 0.5.")
    if unit not in ("step", "epoch"):
        raise ConfigurationError(f"`unit` is {unit!r}; expected 'step' or 'epoch'.")
    n = len(blocks)
    if n == 1:
        return []
    return [
        {unit: round((t0 + (1.0 - t0) * i / (n - 1)) * total), "freeze": block} for i, block in enumerate(blocks[:-1])
    ]


def plan_phase_groups(
    model: nn.Module, phases: Sequence[tuple[str, Sequence[str], float]], defaults: dict[str, Any]
) -> list[dict[str, Any]]:
    """Optimizer groups, one per ``(name, parameter names, lr_scale)`` phase, plus ``"frozen"`` for the rest.

    A parameter joins the first phase that names it; empty groups are dropped; each group gets ``defaults``,
    a ``"name"`` and ``lr = defaults["lr"] * lr_scale``.

    Raises:
        ValueError: If a phase has an ``lr_scale`` but ``defaults`` has no ``lr`` to scale.
    """
    params = dict(model.named_parameters())
    assigned: set[str] = set()
    groups: list[dict[str, Any]] = []
    for name, names, scale in [*phases, ("frozen", list(params), 1.0)]:
        fresh = [n for n in names if n not in assigned]
        assigned.update(fresh)
        if not fresh:
            continue
        group = {**defaults, "params": [params[n] for n in fresh], "name": name}
        if scale != 1.0:
            if "lr" not in defaults:
                raise ConfigurationError(
                    f"schedule entry {name!r} has lr_scale {scale:g} but partial_param_groups got no lr to scale. "
                    "Fix: call self.partial_param_groups(lr=1e-3, ...)."
                )
            group["lr"] = defaults["lr"] * scale
        groups.append(group)
    return groups
