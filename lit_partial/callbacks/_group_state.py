"""Carry a checkpoint's optimizer and LR-scheduler states over to a different parameter-group layout.

A :class:`~lit_partial.LayerFreezing` resumed with ``accept_config_change=True`` and another schedule may build
other optimizer groups than the checkpoint's (an entry added at a new point, or an ``lr_scale`` added to one), and
``torch.optim.Optimizer.load_state_dict`` refuses a state with another number or size of groups. These functions
rewrite the saved states, as plain dicts, into the layout of the optimizer built now:

* **Per-parameter state** (momentum buffers, Adam moments and step) is keyed by parameter name and follows each
  parameter into whatever group holds it now; parameters without saved state start fresh.
* **Group hyperparameters** come from the checkpoint for a group that exists in both layouts (the same
  ``name``, or for unnamed groups the same position among the unnamed ones, else the same parameters), so a
  decayed learning rate stays decayed; only the configured rate is the new one: ``lr`` is rescaled by the ratio
  of the new to the saved ``initial_lr`` (the rate the schedulers started from), or is the new ``lr`` when no
  scheduler set one. A group not in the checkpoint takes the hyperparameters it was built with, its ``lr``
  moved as far along the schedule as the other groups (``initial_lr`` times their ``lr / initial_lr``).
* **Scheduler state** keeps its position (``last_epoch``, plateau counters, ...) and takes its per-group lists
  (``base_lrs``, ``min_lrs``, ...) from the scheduler built now; ``_last_lr`` is the remapped groups' ``lr``.

A layout is what :func:`optimizer_layout` records at save time: per group its ``name`` and its parameter names.

Example:
    >>> saved = {"state": {0: {"momentum_buffer": 1.0}, 1: {"momentum_buffer": 2.0}},
    ...          "param_groups": [{"params": [0, 1], "lr": 0.1}]}
    >>> fresh = {"state": {}, "param_groups": [{"params": [0], "lr": 0.1}, {"params": [1], "lr": 0.01, "name": "u"}]}
    >>> old = [{"name": None, "params": ["a", "b"]}]
    >>> new = [{"name": None, "params": ["a"]}, {"name": "u", "params": ["b"]}]
    >>> remapped = remap_optimizer_state(saved, old, fresh, new)
    >>> remapped["state"], [(g["params"], g["lr"]) for g in remapped["param_groups"]]
    ({0: {'momentum_buffer': 1.0}, 1: {'momentum_buffer': 2.0}}, [([0], 0.1), ([1], 0.01)])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lit_partial.module import attached_trainer

__all__ = [
    "Layout",
    "carry_over",
    "describes",
    "match_groups",
    "optimizer_layout",
    "optimizer_layouts",
    "remap_optimizer_state",
    "remap_resumed_groups",
    "remap_scheduler_state",
]

Layout = list[dict[str, Any]]
"""Per parameter group: ``{"name": str | None, "params": [parameter names]}``."""

#: Group keys that schedulers derive from the configured rate: taken from the new group, never the checkpoint's.
_CONFIGURED_RATES = ("initial_lr", "max_lr", "min_lr")


def optimizer_layout(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> Layout:
    """The groups of ``optimizer`` as plain data: each group's ``name`` and parameter names (``names``: id -> name).

    Example:
        >>> layer = torch.nn.Linear(1, 1)
        >>> opt = torch.optim.SGD([{"params": [layer.weight], "name": "w"}, {"params": [layer.bias]}], lr=0.1)
        >>> optimizer_layout(opt, {id(p): n for n, p in layer.named_parameters()})
        [{'name': 'w', 'params': ['weight']}, {'name': None, 'params': ['bias']}]
    """
    return [
        {"name": group.get("name"), "params": [names.get(id(p)) for p in group["params"]]}
        for group in optimizer.param_groups
    ]


def describes(layout: Layout | None, state: Mapping[str, Any]) -> bool:
    """Whether ``layout`` has the groups and group sizes of the optimizer ``state`` (so it names its parameters)."""
    if not isinstance(layout, list):
        return False
    groups = state.get("param_groups", [])
    return len(layout) == len(groups) and all(
        len(g.get("params", [])) == len(saved["params"]) for g, saved in zip(layout, groups, strict=True)
    )


def _keys(layout: Layout) -> list[tuple[str, Any]]:
    unnamed = 0
    keys: list[tuple[str, Any]] = []
    for group in layout:
        if group.get("name") is None:
            keys.append(("position among unnamed groups", unnamed))
            unnamed += 1
        else:
            keys.append(("name", group["name"]))
    return keys


def match_groups(old: Layout, new: Layout) -> list[int | None]:
    """For each group of ``new``, the index of the same group in ``old`` (by name, else by parameters) or None.

    Example:
        >>> old = [{"name": "trainable", "params": ["a"]}, {"name": "unfreeze@epoch1", "params": ["b"]}]
        >>> new = [{"name": "trainable", "params": ["a"]}, {"name": "unfreeze@epoch1[b]", "params": ["b"]},
        ...        {"name": "unfreeze@epoch1[c]", "params": ["c"]}]
        >>> match_groups(old, new)
        [0, 1, None]
    """
    by_key = {key: i for i, key in enumerate(_keys(old))}
    by_params = {frozenset(g["params"]): i for i, g in enumerate(old) if g["params"]}
    used: set[int] = set()
    matched: list[int | None] = []
    for key, group in zip(_keys(new), new, strict=True):
        found = by_key.get(key)
        if found is None or found in used:
            found = by_params.get(frozenset(group["params"]))
        if found is not None and found in used:
            found = None
        if found is not None:
            used.add(found)
        matched.append(found)
    return matched


def _kept_group(saved: Mapping[str, Any], fresh: Mapping[str, Any]) -> dict[str, Any]:
    """A group in both layouts: the checkpoint's hyperparameters, with the configured rate of ``fresh``."""
    group = {**fresh, **{k: v for k, v in saved.items() if k not in ("params", "param_names", "name")}}
    for key in _CONFIGURED_RATES:
        if key in fresh:
            group[key] = fresh[key]
    if "lr" in fresh and "lr" in saved:
        old_start, new_start = saved.get("initial_lr"), fresh.get("initial_lr")
        if old_start is None or new_start is None or not old_start:
            group["lr"] = fresh["lr"]  # no scheduler moved it: the configured rate is the rate
        elif new_start != old_start:
            group["lr"] = saved["lr"] * (new_start / old_start)  # the schedule's progress, at the new rate
    return group


def remap_optimizer_state(
    saved: Mapping[str, Any], saved_layout: Layout, fresh: Mapping[str, Any], layout: Layout
) -> dict[str, Any]:
    """``saved`` (an optimizer ``state_dict`` with groups ``saved_layout``) in the layout of ``fresh``.

    Args:
        saved: The checkpoint's optimizer state; :func:`describes` must hold for ``saved_layout``.
        saved_layout: Its groups' names and parameter names, recorded when it was saved.
        fresh: The ``state_dict()`` of the optimizer built now (its groups in ``layout``).
        layout: The groups of the optimizer built now.

    Returns:
        A state dict that ``load_state_dict`` of the optimizer built now accepts.
    """
    old_index = {name: i for i, name in enumerate(n for g in saved_layout for n in g["params"]) if name is not None}
    old_ids = [i for g in saved["param_groups"] for i in g["params"]]
    old_state = saved.get("state", {})
    matched = match_groups(saved_layout, layout)
    groups: list[dict[str, Any]] = []
    state: dict[int, Any] = {}
    for group, fresh_group, source in zip(layout, fresh["param_groups"], matched, strict=True):
        groups.append(dict(fresh_group) if source is None else _kept_group(saved["param_groups"][source], fresh_group))
        for name, new_id in zip(group["params"], fresh_group["params"], strict=True):
            position = old_index.get(name) if name is not None else None
            if position is not None and old_ids[position] in old_state:
                state[new_id] = old_state[old_ids[position]]
    progress = _progress([saved["param_groups"][i] for i in matched if i is not None])
    for group, source in zip(groups, matched, strict=True):
        if source is None and progress is not None and "initial_lr" in group:
            group["lr"] = group["initial_lr"] * progress  # joins the schedule where the other groups are
    return {**fresh, "state": state, "param_groups": groups}


def _progress(kept: Sequence[Mapping[str, Any]]) -> float | None:
    """How far the schedulers have moved the rate: ``lr / initial_lr`` of the first kept group that has both.

    Exact for schedules that scale every group alike (LambdaLR with one lambda, StepLR, MultiStepLR,
    ExponentialLR, CosineAnnealingLR without ``eta_min``); for others an approximation of where a new group joins.
    """
    for group in kept:
        start = group.get("initial_lr")
        if start and "lr" in group:
            return float(group["lr"]) / float(start)
    return None


def carry_over(
    saved: Mapping[str, Any], saved_layout: Layout | None, fresh: dict[str, Any], layout: Layout
) -> tuple[dict[str, Any] | None, str]:
    """What an optimizer built with groups ``layout`` loads of the checkpoint's ``saved`` state, and how it was made.

    Returns ``(remapped, "kept")`` when ``saved_layout`` describes ``saved`` (:func:`remap_optimizer_state`);
    ``(None, "as saved")`` without a record when the group sizes agree (it loads as it is); else ``(fresh,
    "dropped")``: the state cannot be mapped, so the optimizer starts as built.
    """
    if saved_layout is not None and describes(saved_layout, saved):
        return remap_optimizer_state(saved, saved_layout, fresh, layout), "kept"
    sizes = [len(g["params"]) for g in saved.get("param_groups", [])]
    if sizes == [len(g["params"]) for g in layout]:
        return None, "as saved"
    return fresh, "dropped"


def remap_scheduler_state(
    saved: Mapping[str, Any], fresh: Mapping[str, Any], lrs: Sequence[float], old_groups: int
) -> dict[str, Any]:
    """A scheduler's ``saved`` state for the groups it has now: its position kept, per-group lists from ``fresh``.

    Args:
        saved: The checkpoint's scheduler state (for ``old_groups`` groups).
        fresh: The ``state_dict()`` of the scheduler built now.
        lrs: The learning rates of the remapped groups (the scheduler's ``_last_lr``).
        old_groups: The number of groups the checkpoint's optimizer had.

    Example:
        >>> saved = {"last_epoch": 4, "base_lrs": [0.1], "_last_lr": [0.05]}
        >>> remap_scheduler_state(saved, {"last_epoch": 0, "base_lrs": [0.1, 0.01], "_last_lr": [0.1, 0.01]},
        ...                       [0.05, 0.01], old_groups=1)
        {'last_epoch': 4, 'base_lrs': [0.1, 0.01], '_last_lr': [0.05, 0.01]}
    """
    new_groups = len(lrs)
    out = dict(saved)
    for key, value in fresh.items():
        old = saved.get(key)
        if key == "_schedulers" and isinstance(value, list) and isinstance(old, list) and len(old) == len(value):
            out[key] = [remap_scheduler_state(s, f, lrs, old_groups) for s, f in zip(old, value, strict=True)]
        elif isinstance(value, list) and len(value) == new_groups and isinstance(old, list) and len(old) == old_groups:
            out[key] = list(value)
    if "_last_lr" in out:
        out["_last_lr"] = list(lrs)
    return out


def optimizer_layouts(model: nn.Module | None) -> list[Layout]:
    """Each optimizer's groups by name and parameter names: what a changed configuration remaps from."""
    trainer = attached_trainer(model) if model is not None else None
    if trainer is None or not trainer.optimizers:
        return []
    names = {id(p): n for n, p in model.named_parameters()}  # type: ignore[union-attr]  # not None: trainer
    return [optimizer_layout(optimizer, names) for optimizer in trainer.optimizers]


def remap_resumed_groups(
    trainer: L.Trainer, pl_module: nn.Module, changed_from: tuple[dict[str, Any], list[Layout | None]] | None
) -> tuple[dict[str, Any], list[Layout | None]] | None:
    """Rewrite the resumed checkpoint's optimizer and scheduler states into this run's group layout.

    Only after a configuration change accepted with ``accept_config_change=True``. Per-parameter state follows
    the parameter by name, groups in both layouts keep their hyperparameters at the new configured rate, new
    groups start as built (see :mod:`lit_partial.callbacks._group_state`). A checkpoint without a record of its
    groups (made before LayerFreezing recorded them) whose layout differs cannot be mapped: its optimizer state
    is dropped, with a warning. Returns what is left to remap (None once done, ``changed_from`` when there are
    no optimizers yet).
    """
    if changed_from is None or not trainer.optimizers:
        return changed_from
    checkpoint, layouts = changed_from
    states, schedulers = checkpoint.get("optimizer_states"), checkpoint.get("lr_schedulers")
    if not trainer.strategy.lightning_restore_optimizer or not isinstance(states, list):
        return None  # the strategy loads optimizer states itself, before callbacks see the checkpoint (FSDP2)
    names = {id(p): n for n, p in pl_module.named_parameters()}
    for k, (optimizer, saved) in enumerate(zip(trainer.optimizers, states, strict=False)):
        layout = optimizer_layout(optimizer, names)
        old = layouts[k] if k < len(layouts) else None
        if old == layout:
            continue
        carried, how = carry_over(saved, old, optimizer.state_dict(), layout)
        if carried is None:
            continue  # the same group sizes and no record: Lightning loads it as it did before groups were recorded
        states[k] = carried
        if how == "dropped":
            rank_zero_warn(
                f"LayerFreezing (accept_config_change=True): the checkpoint's optimizer {k} has another group "
                f"layout ({[len(g['params']) for g in saved['param_groups']]} parameters per group, now "
                f"{[len(g['params']) for g in layout]}) and does not record which parameters its groups held "
                "(it predates that record), so its optimizer state is dropped: the optimizer starts fresh."
            )
        lrs = [group["lr"] for group in states[k]["param_groups"]]
        for j, config in enumerate(trainer.lr_scheduler_configs):
            if config.scheduler.optimizer is optimizer and isinstance(schedulers, list) and j < len(schedulers):
                schedulers[j] = remap_scheduler_state(
                    schedulers[j], config.scheduler.state_dict(), lrs, len(saved["param_groups"])
                )
        if k < len(layouts):
            layouts[k] = layout  # remapped: another LayerFreezing of this run finds nothing left to do
        if how == "kept":
            rank_zero_info(
                f"LayerFreezing (accept_config_change=True): optimizer {k}'s groups changed from "
                f"{[g.get('name') for g in saved['param_groups']]} to {[g['name'] for g in layout]}; each "
                "parameter keeps its optimizer state, groups in both keep their hyperparameters."
            )
    return None
