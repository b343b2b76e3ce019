"""Shared machinery of LISA, BAdam and AdaptiveFreezing: a stack of units (layers, blocks) of which some train.

What the three have in common and none should write again (DESIGN §4.12):

* **Units.** The modules a selector names, in model order; each is one unit with the parameters under it. Units may
  not overlap (a parameter in two units would be switched twice). Everything else keeps its own ``requires_grad``.
* **Nothing frozen before the optimizer exists.** The first switch happens at the first training batch, after
  ``configure_optimizers``: an optimizer built over "parameters that require grad" still holds every unit (the
  LMFlow #726 defect was freezing first).
* **Switches at optimizer-step boundaries.** Callers switch in ``on_train_batch_start`` on ``trainer.global_step``,
  which changes only after an optimizer step, so never inside an accumulation window.
* **Optimizer state.** A unit's parameters can give up their optimizer state
  (:func:`~lit_partial.functional.layer_sampling.drop_optimizer_state`); groups and learning rates stay.
* **DDP.** DDP registers what requires grad when it wraps the model, and a registered parameter that stops getting
  gradients breaks its next step. Units are kept out of DDP from the start (like ``LayerFreezing`` does for
  parameters it freezes later), broadcast from rank 0 at fit start, and the gradients of the units training now are
  averaged by us in ONE coalesced all-reduce per optimizer step, so ranks stay bit-identical without
  ``find_unused_parameters``. When nothing outside the units trains (BAdam beside ``LayerFreezing`` of the rest),
  DDP would have nothing to wrap: the units stay in DDP with ``find_unused_parameters=True`` instead (DDP leaves the
  ``.grad`` of parameters no rank used as None, so frozen units do not move).
* **FSDP2.** ``fully_shard`` replaces the parameters after ``setup``: units are resolved again by name in
  ``on_fit_start``. Every rank switches the same units at the same step, so all issue the same collectives.
* **Teardown.** Every unit parameter gets back the ``requires_grad`` it had before the first switch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning_utilities.core.rank_zero import rank_zero_debug
from torch import nn
from typing_extensions import override

from lit_partial._compat import ddp_ignored_names, set_ddp_ignored_names
from lit_partial._plain import to_plain
from lit_partial.attach import Handle
from lit_partial.callbacks.base import Technique
from lit_partial.distributed import (
    all_reduce_gradients,
    allow_unused_parameters,
    broadcast_parameters,
    is_sharded,
    strategy_family,
    world_size,
)
from lit_partial.errors import ConfigurationError
from lit_partial.functional.freezing import set_requires_grad
from lit_partial.functional.layer_sampling import drop_optimizer_state
from lit_partial.selectors import Selectors, as_selector_list, select_modules

__all__ = ["PeriodicUnitTechnique", "UnitTechnique", "check_bool", "check_int"]


def check_int(value: Any, argument: str, minimum: int) -> int:
    """``value`` if it is an int (not a bool) at least ``minimum``, else a ConfigurationError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"`{argument}` is {value!r}; expected an integer >= {minimum}.")
    return value


def check_bool(value: Any, argument: str) -> bool:
    """``value`` if it is True or False, else a ConfigurationError naming it."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"`{argument}` is {value!r}; expected True or False.")
    return value


class UnitTechnique(Technique):
    """Base of techniques that switch which units of a stack train (see the module docstring).

    Subclasses call :meth:`switch` from their step hooks and may override :meth:`check_units`.
    """

    supported_strategies: ClassVar[tuple[str, ...]] = ("single", "ddp", "fsdp2")
    #: The constructor argument holding the unit selectors, for messages.
    units_argument: ClassVar[str] = "layers"

    def __init__(self, units: Selectors, *, reset_optimizer_state: bool, accept_config_change: bool) -> None:
        super().__init__(accept_config_change=accept_config_change)
        self.units: list[str] = as_selector_list(to_plain(units), argument=self.units_argument)
        self.reset_optimizer_state = check_bool(reset_optimizer_state, "reset_optimizer_state")
        self.unit_names: list[str] = []
        self.unit_params: list[list[tuple[str, nn.Parameter]]] = []
        self.active: tuple[int, ...] | None = None  # units training now; None before the first switch
        self._trainer: L.Trainer | None = None
        self._before: list[list[bool]] = []  # each unit parameter's requires_grad before the first switch
        self._reduce: list[nn.Parameter] = []  # trainable unit parameters whose gradients we average under DDP
        self._ddp = False
        self._ddp_reduces = False  # the units stayed in DDP (nothing else trains): DDP reduces their gradients

    # ---------------------------------------------------------------- setup
    def check_units(self, model: nn.Module) -> None:
        """Model-dependent checks of the subclass's arguments against ``len(self.unit_names)``."""

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        modules = select_modules(pl_module, self.units)
        names = [name for name, _ in modules]
        for name in names:
            outer = next((other for other in names if name.startswith(other + ".")), None)
            if outer is not None:
                raise ConfigurationError(
                    f"{type(self).__name__}: `{self.units_argument}`={self.units} selects {outer!r} and {name!r} "
                    "inside it, so units overlap. Fix: select the units themselves, one level, e.g. "
                    f"'{outer.rpartition('.')[0] or outer}.*'."
                )
        owner: dict[int, str] = {}
        self.unit_names, self.unit_params = [], []
        for name, module in modules:
            params = [(f"{name}.{n}", p) for n, p in module.named_parameters()]
            if not params:
                raise ConfigurationError(
                    f"{type(self).__name__}: unit {name!r} ({type(module).__name__}) has no parameters; select "
                    "modules that hold weights, e.g. the decoder layers."
                )
            for _, p in params:
                if id(p) in owner:
                    raise ConfigurationError(
                        f"{type(self).__name__}: units {owner[id(p)]!r} and {name!r} share a parameter (tied weights), "
                        "so switching one would switch the other. Fix: leave one of them out of the units."
                    )
                owner[id(p)] = name
            self.unit_names.append(name)
            self.unit_params.append(params)
        self.check_units(pl_module)
        self.active = None
        self._before = [[p.requires_grad for _, p in params] for params in self.unit_params]
        before = [(p, flag) for params, flags in zip(self.unit_params, self._before, strict=True)
                  for (_, p), flag in zip(params, flags, strict=True)]  # fmt: skip

        def restore() -> None:
            for p, flag in before:
                p.requires_grad_(flag)

        self.handles.add(Handle(restore))
        self._exclude_from_ddp(trainer, pl_module)

    def _exclude_from_ddp(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ddp_reduces = False
        if strategy_family(trainer) != "ddp":
            return
        existing = ddp_ignored_names(pl_module)
        ours = [n for params in self.unit_params for n, _ in params]
        ignored = set(existing) | set(ours)
        if not any(p.requires_grad for n, p in pl_module.named_parameters() if n not in ignored):
            # Only units train (e.g. BAdam with embeddings and head frozen): DDP needs parameters to wrap, so the
            # units stay in DDP, which then finds the frozen ones unused each step and leaves their .grad None.
            allow_unused_parameters(trainer, type(self).__name__, "only the units train, and only some at a time")
            self._ddp_reduces = True
            return
        set_ddp_ignored_names(pl_module, existing + [n for n in ours if n not in set(existing)])
        self.handles.add(Handle(lambda: set_ddp_ignored_names(pl_module, existing)))

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if is_sharded(trainer):  # fully_shard replaced the parameters by DTensor ones: the same names, new objects
            params = dict(pl_module.named_parameters())
            self.unit_params = [[(name, params[name]) for name, _ in unit] for unit in self.unit_params]
        self._ddp = strategy_family(trainer) == "ddp" and world_size() > 1 and not self._ddp_reduces
        if self._ddp:  # DDP broadcasts only what it registered; the units start identical too
            broadcast_parameters([p for params in self.unit_params for _, p in params])

    @override
    def cleanup(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        self._trainer, self._reduce, self._ddp = None, [], False

    # ---------------------------------------------------------------- switching
    def switch(self, active: Iterable[int], drop: Iterable[int] = ()) -> None:
        """Make exactly the units ``active`` trainable; with ``reset_optimizer_state``, units ``drop`` lose state.

        Inactive unit parameters get ``requires_grad=False`` and ``.grad=None`` (optimizers skip them: no update,
        no weight decay, no momentum); active ones the ``requires_grad`` they had before the first switch.
        """
        chosen = tuple(sorted(set(active)))
        for i, params in enumerate(self.unit_params):
            if i in chosen:  # back to what it had before the first switch (a parameter frozen by you stays frozen)
                for (_, p), flag in zip(params, self._before[i], strict=True):
                    p.requires_grad_(flag)
            else:
                set_requires_grad([p for _, p in params], False)
        if self.reset_optimizer_state:
            dropped = [p for i in sorted(set(drop)) for _, p in self.unit_params[i]]
            optimizers = self._trainer.optimizers if self._trainer is not None else []
            drop_optimizer_state(optimizers, dropped)
        self.active = chosen
        self._reduce = [p for i in chosen for _, p in self.unit_params[i] if p.requires_grad]

    def active_names(self) -> list[str]:
        """Names of the units training now."""
        return [self.unit_names[i] for i in self.active or ()]

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._ddp:  # after DDP's own all-reduce and AMP unscaling, before clipping: like DDP would
            all_reduce_gradients(self._reduce)

    def report(self, message: str) -> None:
        """A log line on rank 0, prefixed with the technique's name."""
        rank_zero_info(f"{type(self).__name__}: {message}")


class PeriodicUnitTechnique(UnitTechnique):
    """A :class:`UnitTechnique` whose active units are a function of the period ``global_step // interval``.

    Subclasses set :attr:`interval` and implement :meth:`units_for` and :meth:`units_to_drop`. The period applied
    last is saved; on resume the units of the saved period are made trainable again without dropping any state
    (the optimizer state in the checkpoint is already what it should be), so a resumed run equals the
    uninterrupted one bit for bit, mid-period included.
    """

    interval: int = 1

    def __init__(self, units: Selectors, *, reset_optimizer_state: bool, accept_config_change: bool) -> None:
        super().__init__(units, reset_optimizer_state=reset_optimizer_state, accept_config_change=accept_config_change)
        self.period: int | None = None  # the period whose units are active
        self.switches = 0
        self._resumed = False  # the period came from a checkpoint: re-apply its units without dropping state

    def units_for(self, period: int) -> list[int]:
        """The units that train in ``period``."""
        raise NotImplementedError

    def units_to_drop(self, previous: tuple[int, ...], active: list[int]) -> list[int]:
        """The units whose optimizer state is dropped when ``active`` follows ``previous``."""
        raise NotImplementedError

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().attach(trainer, pl_module)
        self.period, self.switches, self._resumed = None, 0, False

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        period = trainer.global_step // self.interval
        if period == self.period and not self._resumed:
            return  # inside a period, or inside an accumulation window (global_step moves per optimizer step)
        active = self.units_for(period)
        if self._resumed and period == self.period:
            self.switch(active)  # the checkpoint's optimizer state belongs to these units already
        else:
            self.switch(active, self.units_to_drop(self.active or (), active))
            self.switches += 1
            names = ", ".join(self.active_names())
            rank_zero_debug(f"{type(self).__name__}: period {period} (step {trainer.global_step}): training {names}")
        self.period, self._resumed = period, False

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"period": self.period, "active": self.active_names(), "switches": self.switches}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self.period = state.get("period")
        self.switches = int(state.get("switches", 0))
        self._resumed = self.period is not None
