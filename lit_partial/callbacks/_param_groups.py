"""Optimizer parameter groups for :class:`~lit_partial.LayerFreezing`: planned up front, or split off afterwards.

* :func:`plan_phase_groups`: one named group per schedule phase (what ``partial_param_groups`` returns).
* :func:`scale_unplanned_groups`: for an optimizer *not* built from ``partial_param_groups`` (LightningCLI's
  ``optimizer:``, hand-written ``configure_optimizers``), the parameters of an entry with ``lr_scale`` are moved
  into a group of their own at ``lr * lr_scale``, and the LR schedulers are extended to match.
* :func:`warn_on_unoptimized`: parameters the schedule unfreezes that no optimizer holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import lr_scheduler

from lit_partial.errors import ConfigurationError

__all__ = ["plan_phase_groups", "scale_unplanned_groups", "warn_on_unoptimized"]

#: LR schedulers whose per-group state is ``base_lrs`` (plus ``lr_lambdas`` or ``min_lrs``), which
#: :func:`scale_unplanned_groups` extends when it adds a parameter group after them.
_SPLITTABLE_SCHEDULERS: tuple[type, ...] = (
    lr_scheduler.LambdaLR,
    lr_scheduler.MultiplicativeLR,
    lr_scheduler.StepLR,
    lr_scheduler.MultiStepLR,
    lr_scheduler.ConstantLR,
    lr_scheduler.LinearLR,
    lr_scheduler.ExponentialLR,
    lr_scheduler.PolynomialLR,
    lr_scheduler.CosineAnnealingLR,
    lr_scheduler.CosineAnnealingWarmRestarts,
    lr_scheduler.ReduceLROnPlateau,
)


def _extend_scheduler(scheduler: Any, index: int, scale: float) -> None:
    """Give ``scheduler`` the state of one more parameter group: group ``index``'s, its learning rates scaled."""
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs.append(scheduler.base_lrs[index] * scale)
    for name in ("lr_lambdas", "min_lrs"):
        values = getattr(scheduler, name, None)
        if isinstance(values, list):
            values.append(values[index])


def _split_name(group: dict[str, Any], index: int, several: bool, phase: str) -> str:
    """The name of the group split from optimizer group ``index`` for schedule group ``phase``: unique and stable.

    ``<group name>/<phase>`` for a named group; for unnamed ones ``pg<index + 1>/<phase>`` (LearningRateMonitor's
    label of the group it came from) when the optimizer has several groups, else ``<phase>``.
    """
    if "name" in group:
        return f"{group['name']}/{phase}"
    return f"pg{index + 1}/{phase}" if several else phase


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


def warn_on_unoptimized(trainer: L.Trainer, pl_module: nn.Module, later: Sequence[str]) -> None:
    """Warn when parameters the schedule unfreezes later (``later``: their names) are in no optimizer."""
    in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    missing = [n for n in dict.fromkeys(later) if id(pl_module.get_parameter(n)) not in in_optimizer]
    if trainer.optimizers and missing:
        rank_zero_warn(
            f"LayerFreezing will unfreeze {missing[:5]} (and {max(len(missing) - 5, 0)} more), which no optimizer "
            "holds, so they will never change. Fix: pass all parameters to the optimizer (frozen ones are "
            "skipped), or `self.partial_param_groups(lr=...)`."
        )


def scale_unplanned_groups(trainer: L.Trainer, plan: list[dict[str, Any]]) -> None:
    """Give ``lr_scale`` entries their rate when the optimizer did not come from ``partial_param_groups``.

    LightningCLI's ``optimizer:`` and hand-written ``configure_optimizers`` put all parameters in groups of
    their own; the parameters of a scaled entry are moved from each group into a new group with the same
    options and ``lr * lr_scale`` (``initial_lr`` too), and the group's LR schedulers are extended to match.
    The new group is named after the schedule group, ``unfreeze@epoch1``, prefixed by the group it came from
    where the optimizer has several (``pg2/unfreeze@epoch1``, ``decay/unfreeze@epoch1`` for a group named
    ``decay``), so LearningRateMonitor sees distinct names. This runs in ``on_fit_start``, before Lightning
    restores optimizer and scheduler states, so a resumed run finds the same groups. Schedulers LayerFreezing
    cannot extend (any not in ``_SPLITTABLE_SCHEDULERS``) keep the groups as they are, with a warning naming
    the fix.

    ``plan``: the schedule's groups planned with ``lr=1.0`` (so each group's ``lr`` is its scale).
    """
    if not trainer.optimizers:
        return
    planned_names = {group["name"] for group in plan}
    scale_of = {id(p): (group["name"], group["lr"]) for group in plan if group["lr"] != 1.0 for p in group["params"]}
    for optimizer in trainer.optimizers:
        if any(group.get("name") in planned_names for group in optimizer.param_groups):
            continue  # built from partial_param_groups: the groups are there already
        schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
        unknown = sorted({type(s).__name__ for s in schedulers if not isinstance(s, _SPLITTABLE_SCHEDULERS)})
        if unknown:
            rank_zero_warn(
                f"LayerFreezing: schedule entries with lr_scale need their own optimizer parameter groups, but the "
                f"optimizer was not built from `self.partial_param_groups(...)`, and its LR scheduler(s) {unknown} "
                "cannot be extended with new groups, so those parameters will learn at the base rate. Fix: build "
                "the optimizer from `self.partial_param_groups(lr=...)` in configure_optimizers."
            )
            continue
        several = len(optimizer.param_groups) > 1
        for index, group in enumerate(list(optimizer.param_groups)):
            moved: dict[tuple[str, float], list[nn.Parameter]] = {}
            kept = []
            for p in group["params"]:
                hit = scale_of.get(id(p))
                kept.append(p) if hit is None else moved.setdefault(hit, []).append(p)
            if not moved:
                continue
            group["params"] = kept
            for (phase, scale), params in moved.items():
                new = {key: value for key, value in group.items() if key != "params"}
                new["name"] = _split_name(group, index, several, phase)
                for key in ("lr", "initial_lr"):
                    if key in new:
                        new[key] = group[key] * scale
                optimizer.add_param_group({**new, "params": params})
                for scheduler in schedulers:
                    _extend_scheduler(scheduler, index, scale)
                rank_zero_info(
                    f"LayerFreezing: optimizer group {new['name']!r} holds the {len(params)} tensors of schedule "
                    f"group {phase!r} at lr x {scale:g} (the optimizer was not built from partial_param_groups)."
                )
