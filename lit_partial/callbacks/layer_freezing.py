"""``LayerFreezing``: freeze modules, and unfreeze or freeze them on a schedule, exactly under DDP and resume.

The tensor work lives in :mod:`lit_partial.functional.freezing`; this callback decides when, keeps the
state for resume, and makes DDP correct:

* It freezes in ``setup``, before Lightning wraps the model in DDP, so DDP registers only what trains.
* Parameters DDP does not know about (unfrozen later) get their gradients averaged by us in ONE coalesced
  all-reduce in ``on_before_optimizer_step`` (once per optimizer step, so ``accumulate_grad_batches`` is
  respected), so replicas stay bit-identical without ``find_unused_parameters``.
* Parameters that a ``"freeze"`` entry will freeze later are kept out of DDP from the start and reduced the
  same way while they train: a parameter DDP registered that stops receiving gradients would make DDP fail
  on the next step.

Example:
    >>> import lightning as L
    >>> cb = LayerFreezing(frozen="backbone", schedule=[{"epoch": 2, "unfreeze": "backbone.2", "lr_scale": 0.1}])
    >>> from lit_partial.demos import DigitsClassifier, DigitsDataModule
    >>> trainer = L.Trainer(callbacks=[cb], max_epochs=3, limit_train_batches=1, logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    ...                     limit_val_batches=0)
    >>> model = DigitsClassifier()
    >>> trainer.fit(model, DigitsDataModule())
    >>> [next(model.backbone[i].parameters()).requires_grad for i in range(3)]  # backbone.2 released at epoch 2
    [False, False, True]
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_partial._compat import is_running_stats_norm
from lit_partial._plain import to_plain
from lit_partial.callbacks._ddp_sync import UnsyncedParams, reload_sharded_optimizer_state
from lit_partial.callbacks._freezing_schedule import (
    ScheduleEntry,
    callback_yaml,
    entry_spec,
    gradual_unfreezing_schedule,
    group_names,
    parse_schedule,
    progressive_freezing_schedule,
)
from lit_partial.callbacks._group_state import (
    Layout,
    optimizer_layouts,
    remap_resumed_groups,
)
from lit_partial.callbacks._param_groups import plan_phase_groups, scale_unplanned_groups, warn_on_unoptimized
from lit_partial.callbacks.base import Technique
from lit_partial.conditions import Condition, StepContext
from lit_partial.errors import ConfigurationError
from lit_partial.functional.freezing import (
    find_block_stack,
    hold_eval,
    norm_parameter_ids,
    set_requires_grad,
    trainable_parameter_count,
)
from lit_partial.functional.frozen_checkpointing import frozen_aware_checkpointing
from lit_partial.selectors import Selectors, as_selector_list, describe_ties, select_parameters, select_submodules

__all__ = ["LayerFreezing"]


def _entry_config(entry: ScheduleEntry, *, legacy: bool = False) -> dict[str, Any]:
    """A schedule entry as plain data, its condition as the spec it parses from (None for epoch and step entries).

    ``legacy``: as checkpoints written before configurations were plain data recorded it (``when`` only where set,
    as ``repr()`` of the condition).
    """
    config = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry) if f.name != "when"}
    if not legacy:
        config["when"] = entry.when.to_spec() if entry.when is not None else None
    elif entry.when is not None:
        config["when"] = repr(entry.when)
    return config


class LayerFreezing(Technique):
    """Freeze modules from the start and unfreeze (or freeze) them on a schedule of epochs or steps.

    Frozen parameters get ``requires_grad=False`` and ``.grad=None``, so any optimizer (momentum, Adam, weight
    decay) leaves them bit-identical; pass all parameters to the optimizer, or better
    ``self.partial_param_groups(lr=...)`` (:class:`~lit_partial.PartialBackpropMixin`), which plans one group per
    schedule phase up front so LR schedulers see every group from the first step.

    Args:
        frozen: Selectors of what is frozen from the start (exact name, glob or ``re:<pattern>``); None = nothing.
        schedule: Entries ``{"epoch": E}``, ``{"step": S}`` or ``{"when": condition}`` with ``"unfreeze"``
            and/or ``"freeze"`` selectors and an optional ``"lr_scale"`` for the group of what they unfreeze.
            Epoch entries apply at the start of that epoch; step entries before optimizer step ``S`` (first
            micro-batch of its accumulation window); ``when`` entries once, at the first epoch start at which the
            condition holds (e.g. ``{"plateau": "val_loss", "patience": 2}``), and only after every entry before
            them has applied: a metric condition then sees only the evaluations made since the previous entry
            applied, so successive plateau entries wait for successive plateaus. Metric values are rank 0's,
            recorded as ``EarlyStopping`` checks its monitor, and saved for resume. Any ``lr_scale`` applies even
            when the optimizer does not come from ``partial_param_groups`` (see :meth:`on_fit_start`).
        train_bn: If True, norm layers with running statistics inside frozen modules keep training (Lightning's
            ``BaseFinetuning`` default). If False, they are frozen and stay in eval mode, also after Lightning's
            ``model.train()`` calls, so the frozen prefix needs no backward at all.
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`).

    Example:
        >>> cb = LayerFreezing.gradual_unfreezing(["backbone.0", "backbone.1", "backbone.2"], lr_decay=2.6)
        >>> [e.describe() for e in cb.schedule][0]
        'epoch 1: unfreeze backbone.2 (lr_scale 0.385)'
    """

    def __init__(
        self,
        frozen: Selectors | None = None,
        schedule: Sequence[Any] | None = None,
        train_bn: bool = False,
        *,
        accept_config_change: bool = False,
    ) -> None:
        super().__init__(accept_config_change=accept_config_change)
        frozen = to_plain(frozen)
        self.frozen: list[str] = [] if frozen is None else as_selector_list(frozen, argument="frozen")
        self.schedule: list[ScheduleEntry] = parse_schedule(schedule)
        raw = to_plain(schedule) or []
        self._when_specs = [r.get("when") if isinstance(r, dict) else None for r in raw]  # as written, for to_yaml
        if not isinstance(train_bn, bool):
            raise ConfigurationError(f"`train_bn` is {train_bn!r}; expected True or False.")
        if not self.frozen and not self.schedule:
            raise ConfigurationError(
                "LayerFreezing got neither `frozen` nor `schedule`; give at least one, e.g. frozen='backbone'."
            )
        self.train_bn = train_bn
        self._applied: list[bool] = [False] * len(self.schedule)
        self._pending: list[int] = list(range(len(self.schedule)))  # entries not applied yet, in schedule order
        self._held: dict[str, bool] = {}  # norm-module name -> kept in eval mode
        self._held_modules: list[nn.Module] = []
        self._sync = UnsyncedParams()  # what DDP does not reduce (parameters the schedule freezes or unfreezes)
        self._events: list[str] = []
        self._trained: weakref.ref[nn.Module] | None = None  # the model of the last fit, for state_dict after it
        self.trainable_params: int | None = None
        self._applied_eval: list[int | None] = [None] * len(self.schedule)  # evaluations recorded when applied
        self._when_checked: int | None = None  # the epoch whose start checked the `when` entries
        # accept_config_change: the resumed checkpoint and its optimizers' group layouts (see remap_resumed_groups)
        self._changed_from: tuple[dict[str, Any], list[Layout | None]] | None = None

    @override
    def metrics_read(self) -> list[str]:
        return [name for entry in self.schedule if entry.when is not None for name in entry.when.metrics]

    # ------------------------------------------------------------------ recipes
    @classmethod
    def gradual_unfreezing(
        cls,
        blocks: Sequence[str],
        every_n_epochs: int = 1,
        start_epoch: int | None = None,
        lr_decay: float = 1.0,
        train_bn: bool = False,
    ) -> LayerFreezing:
        """ULMFiT: all ``blocks`` frozen, then one more from the top every ``every_n_epochs`` epochs.

        ``blocks`` run bottom to top; what is not listed (the head) trains from the start. With ``lr_decay``
        (2.6 in ULMFiT) each block's group learns ``lr_decay`` times slower than the block above it.
        """
        schedule = gradual_unfreezing_schedule(blocks, every_n_epochs, start_epoch, lr_decay)
        return cls(frozen=list(blocks), schedule=schedule, train_bn=train_bn)

    @classmethod
    def gradual(
        cls,
        model: nn.Module,
        stack: str | None = None,
        every_n_epochs: int = 1,
        start_epoch: int | None = None,
        lr_decay: float = 1.0,
        train_bn: bool = False,
        freeze_below: bool = True,
    ) -> LayerFreezing:
        """Gradual unfreezing planned from ``model``'s depth (finetuning-scheduler's generated schedule, ULMFiT's).

        The blocks are found by :func:`~lit_partial.functional.freezing.find_block_stack` (the longest
        ``ModuleList`` / ``Sequential`` of same-class blocks, or the container ``stack`` names). What comes after
        them (final norm, head) trains from the start; then one more block from the top every ``every_n_epochs``
        epochs, each ``lr_decay`` times slower than the one above; with ``freeze_below``, what comes before them
        (embeddings, stem) is frozen too and unfreezes last. :meth:`to_yaml` writes the result as a preset.

        Raises:
            ConfigurationError: If the model has no block stack (name it with ``stack``), or nothing after its
                blocks would train first (then pass ``start_epoch=0``).

        Example:
            >>> from lit_partial.demos import DigitsClassifier
            >>> cb = LayerFreezing.gradual(DigitsClassifier(), lr_decay=2.0)
            >>> cb.frozen
            ['backbone.0', 'backbone.1', 'backbone.2']
            >>> for entry in cb.schedule:
            ...     print(entry.describe())
            epoch 1: unfreeze backbone.2 (lr_scale 0.5)
            epoch 2: unfreeze backbone.1 (lr_scale 0.25)
            epoch 3: unfreeze backbone.0 (lr_scale 0.125)
        """
        if not isinstance(freeze_below, bool):
            raise ConfigurationError(f"`freeze_below` is {freeze_below!r}; expected True or False.")
        found = find_block_stack(model, stack)
        if not found.above and start_epoch is None:
            raise ConfigurationError(
                f"{type(model).__name__} has nothing after its blocks ({found.container}.*) to train first, so the "
                "first phase would train nothing. Fix: pass start_epoch=0 (the top block unfreezes at once)."
            )
        below = found.below if freeze_below else []
        groups: list[str | list[str]] = [*([below] if below else []), *found.blocks]
        schedule = gradual_unfreezing_schedule(groups, every_n_epochs, start_epoch, lr_decay)
        return cls(frozen=[*below, *found.blocks], schedule=schedule, train_bn=train_bn)

    def arguments(self) -> dict[str, Any]:
        """The constructor arguments that build this callback again, as plain data (what :meth:`to_yaml` writes).

        Raises:
            ConfigurationError: If a ``when`` entry was given as a condition object, which has no plain form.
        """
        for i, spec in enumerate(self._when_specs):
            if isinstance(spec, Condition):
                raise ConfigurationError(
                    f"schedule[{i}]['when'] is the object {spec!r}, which cannot be written out; give it in its dict "
                    "form (e.g. {'plateau': 'val_loss', 'patience': 2}) to write the schedule as YAML."
                )
        arguments: dict[str, Any] = {
            "frozen": list(self.frozen),
            "schedule": [entry_spec(e, w) for e, w in zip(self.schedule, self._when_specs, strict=True)],
            "train_bn": self.train_bn,
        }
        if self.accept_config_change:
            arguments["accept_config_change"] = True
        return arguments

    def to_yaml(self, style: str = "hydra", name: str = "layer_freezing") -> str:
        """This callback as YAML, to keep a generated schedule or hand it to a colleague.

        ``style="hydra"``: a ``partial=`` preset named ``name`` (``conf/partial/<file>.yaml``);
        ``style="lightning_cli"``: an item of a LightningCLI config's ``trainer.callbacks`` list.

        Example:
            >>> print(LayerFreezing(frozen="b", schedule=[{"epoch": 1, "unfreeze": "b"}]).to_yaml(name="thaw"))
            thaw:
              _target_: lit_partial.LayerFreezing
              frozen: [b]
              schedule:
              - {epoch: 1, unfreeze: b}
              train_bn: false
            <BLANKLINE>
        """
        return callback_yaml("lit_partial.LayerFreezing", self.arguments(), style=style, name=name)

    @classmethod
    def progressive_freezing(
        cls, blocks: Sequence[str], total: int, t0: float = 0.5, unit: str = "step", train_bn: bool = False
    ) -> LayerFreezing:
        """FreezeOut: block ``i`` of ``N`` (bottom first) freezes at ``t0 + (1 - t0) i/(N-1)`` of ``total``."""
        return cls(schedule=progressive_freezing_schedule(blocks, total, t0, unit), train_bn=train_bn)

    # ------------------------------------------------------------------ Technique contract
    @override
    def config(self) -> dict[str, Any]:
        return {
            "frozen": self.frozen,
            "schedule": [_entry_config(entry) for entry in self.schedule],
            "train_bn": self.train_bn,
        }

    @override
    def legacy_config(self) -> dict[str, Any] | None:
        return {**self.config(), "schedule": [_entry_config(entry, legacy=True) for entry in self.schedule]}

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trained = weakref.ref(pl_module)
        self._applied = [False] * len(self.schedule)  # a new fit starts the schedule; resume restores it after this
        self._pending = list(range(len(self.schedule)))
        self._held, self._events = {}, []
        self._applied_eval, self._when_checked = [None] * len(self.schedule), None
        for entry in self.schedule:  # resolve everything now: unknown names fail before the first step
            self._params(pl_module, entry.unfreeze + entry.freeze)
        if self.frozen:
            self._change(pl_module, self.frozen, trainable=False)
        selected = self.frozen + [s for entry in self.schedule for s in entry.unfreeze + entry.freeze]
        for note in describe_ties(pl_module, self._params(pl_module, selected) if selected else []):
            rank_zero_info(f"LayerFreezing: {note}; freezing or unfreezing either name changes both.")
        self._check_schedule(pl_module)
        later = [n for e in self.schedule if e.freeze for n, _ in self._params(pl_module, e.freeze)]
        self._sync.exclude(trainer, pl_module, later, self.handles)
        self._report(trainer, pl_module, "start", f"froze {', '.join(self.frozen)}" if self.frozen else "")
        self.handles.add(frozen_aware_checkpointing(pl_module))  # HF checkpointing skips what is frozen (#23)

    @override
    def cleanup(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        self._sync.reset()

    @override
    def run_summary(self) -> list[str]:
        return [f"LayerFreezing {line}" for line in self._events]

    # ------------------------------------------------------------------ resolution
    def _params(self, model: nn.Module, selectors: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
        """Parameters of ``selectors``; with ``train_bn`` the norm layers' own parameters are left out."""
        chosen = select_parameters(model, list(selectors))
        if not self.train_bn:
            return chosen
        keep = norm_parameter_ids(model)
        return [(n, p) for n, p in chosen if id(p) not in keep]

    @staticmethod
    def _norms(model: nn.Module, selectors: Sequence[str]) -> list[str]:
        """Names of running-stat norm layers under the modules that ``selectors`` name."""
        return [n for n, m in select_submodules(model, list(selectors), missing_ok=True) if is_running_stats_norm(m)]

    def _change(self, model: nn.Module, selectors: Sequence[str], trainable: bool) -> list[str]:
        params = self._params(model, selectors)
        names = [n for n, p in params if p.requires_grad != trainable]
        set_requires_grad([p for _, p in params], trainable)
        self._sync.changed()
        for norm in self._norms(model, selectors):
            self._held[norm] = not trainable and not self.train_bn
            if not self._held[norm]:
                model.get_submodule(norm).train(model.training)
        self._held_modules = [model.get_submodule(n) for n, held in self._held.items() if held]
        return names

    def _hold(self) -> None:
        # Held in the train hooks only: eval modules before on_train_start would trip Lightning's eval-mode warning.
        hold_eval(self._held_modules)

    def _check_schedule(self, model: nn.Module) -> None:
        """Warn on unfreezing what will not be frozen; refuse a phase in which nothing at all is trainable."""
        params = dict(model.named_parameters())
        frozen = {n for n, p in params.items() if not p.requires_grad}
        self._refuse_all_frozen(model, frozen, params, None)
        for i, entry in enumerate(self.schedule):
            unfreeze: set[str] = set()
            for selector in entry.unfreeze:
                names = [n for n, _ in self._params(model, [selector])]
                if not frozen.intersection(names):
                    rank_zero_warn(
                        f"LayerFreezing schedule entry '{entry.describe()}' unfreezes {selector!r} ({names[:3]}...), "
                        "which will not be frozen at that point, so nothing changes. Fix: freeze it first or drop it."
                    )
                base = [n for n in names if n in frozen and ".base_layer." in n]
                if base:  # PEFT keeps the pretrained weight of an adapted layer in `<layer>.base_layer`
                    rank_zero_warn(
                        f"LayerFreezing schedule entry '{entry.describe()}' unfreezes {selector!r}, which selects "
                        f"{len(base)} frozen PEFT base weights ({base[:2]}...), not only adapter weights. Fix: to "
                        f"unfreeze only LoRA weights, select '{selector}.lora_*' (the adapters of the layers it "
                        f"names) or '{selector}.**.lora_*' (adapters anywhere below them); keep {selector!r} to "
                        "fine-tune the base weights too."
                    )
                unfreeze.update(names)
            refrozen = {n for n, _ in self._params(model, entry.freeze)} if entry.freeze else set()
            frozen = (frozen - unfreeze) | refrozen
            following = self.schedule[i + 1] if i + 1 < len(self.schedule) else None
            if following is None or (following.kind, following.point) != (entry.kind, entry.point):
                self._refuse_all_frozen(model, frozen, params, entry)

    def _refuse_all_frozen(
        self, model: nn.Module, frozen: set[str], params: dict[str, nn.Parameter], after: ScheduleEntry | None
    ) -> None:
        if len(frozen) < len(params):
            return
        first = self.schedule[0] if self.schedule else None
        if after is None and first is not None and first.kind != "when" and first.point == 0 and first.unfreeze:
            return  # an entry at epoch/step 0 unfreezes before the first step
        when = "from the start" if after is None else f"after '{after.describe()}'"
        raise ConfigurationError(
            f"LayerFreezing leaves no parameter of {type(model).__name__} trainable {when} (frozen={self.frozen}), "
            "so there is nothing to backpropagate into (torch would stop with 'element 0 of tensors does not "
            "require grad'). Fix: keep at least one module trainable (e.g. the head), or unfreeze something earlier."
        )

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync.start(trainer, pl_module)
        later = [n for e in self.schedule if e.unfreeze for n, _ in self._params(pl_module, e.unfreeze)]
        warn_on_unoptimized(trainer, pl_module, later)
        if any(entry.lr_scale != 1.0 for entry in self.schedule):
            scale_unplanned_groups(trainer, self.plan_param_groups(pl_module, {"lr": 1.0}))
        self._changed_from = remap_resumed_groups(trainer, pl_module, self._changed_from)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._sync.reduce(optimizer)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._warn_on_unreachable(trainer)
        self._hold()

    def _warn_on_unreachable(self, trainer: L.Trainer) -> None:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 0 else math.inf
        total_steps = float(trainer.estimated_stepping_batches)
        for i in self._pending:
            entry = self.schedule[i]
            if entry.kind == "when":
                continue
            limit, unit = (max_epochs, "epochs") if entry.kind == "epoch" else (total_steps, "optimizer steps")
            if entry.point >= limit:
                rank_zero_warn(
                    f"LayerFreezing schedule entry '{entry.describe()}' will never run: the run has {limit:g} {unit} "
                    f"(max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}). Fix: move the entry earlier "
                    "or train longer."
                )

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply_due(trainer, pl_module, kinds=("epoch",))
        self._apply_when(trainer, pl_module)
        self._hold()

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Epoch entries too: resuming from a checkpoint saved on an epoch's last batch skips the next epoch start.
        if self._pending:
            self._apply_due(trainer, pl_module, kinds=("epoch", "step"))
            self._apply_when(trainer, pl_module)
        self._hold()

    def _apply_when(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply `when` entries in order, at most once per epoch start (or first batch, after a resume)."""
        if self._when_checked == trainer.current_epoch:
            return
        self._when_checked = trainer.current_epoch
        for i in list(self._pending):
            entry = self.schedule[i]
            if entry.when is None:
                continue
            if not all(self._applied[:i]):  # waits for every entry before it
                return
            since = (self._applied_eval[i - 1] or 0) if i else 0
            history = {name: tuple(values[since:]) for name, values in self.metric_recorder.history.items()}
            ctx = StepContext(epoch=trainer.current_epoch, global_step=trainer.global_step, metrics=history)
            if not entry.when(ctx, salt=f"schedule[{i}]"):
                return
            self._apply_entry(i, trainer, pl_module)

    def _apply_due(self, trainer: L.Trainer, pl_module: L.LightningModule, kinds: tuple[str, ...]) -> None:
        now = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        for i in list(self._pending):
            entry = self.schedule[i]
            if entry.kind not in kinds or entry.point > now[entry.kind]:
                continue
            self._apply_entry(i, trainer, pl_module)

    def _apply_entry(self, i: int, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        entry = self.schedule[i]
        unfrozen = self._change(pl_module, entry.unfreeze, trainable=True) if entry.unfreeze else []
        frozen = self._change(pl_module, entry.freeze, trainable=False) if entry.freeze else []
        self._applied[i] = True
        self._applied_eval[i] = self.metric_recorder.count
        self._pending.remove(i)
        what = "; ".join(
            s
            for s in (
                f"unfroze {len(unfrozen)} tensors ({', '.join(entry.unfreeze)})" if unfrozen else "",
                f"froze {len(frozen)} tensors ({', '.join(entry.freeze)})" if frozen else "",
            )
            if s
        )
        when = f"epoch {trainer.current_epoch} ({entry.describe().split(':')[0]})" if entry.when else ""
        self._report(trainer, pl_module, when or f"{entry.kind} {entry.point}", what or "no change")

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, when: str, what: str) -> None:
        self.trainable_params = trainable_parameter_count(pl_module)
        total = sum(p.numel() for p in pl_module.parameters())
        if what:
            line = f"at {when}: {what}; trainable parameters {self.trainable_params:,} of {total:,}"
            rank_zero_info(f"LayerFreezing {line}")
            self._events.append(f"{line} ({100.0 * self.trainable_params / max(total, 1):.1f}%)")
        for logger in trainer.loggers:
            logger.log_metrics(
                {"layer_freezing/trainable_params": float(self.trainable_params)}, step=trainer.global_step
            )

    # ------------------------------------------------------------------ planning (ParamGroupPlanner)
    def plan_param_groups(self, model: nn.Module, defaults: dict[str, Any]) -> list[dict[str, Any]]:
        """One parameter group per schedule phase, all present from the start, each named (``"name"`` key).

        ``"trainable"`` holds what trains from the start, ``"unfreeze@epoch2"`` what that entry unfreezes
        (learning rate ``lr * lr_scale``; entries sharing a point are told apart by their selectors,
        ``"unfreeze@epoch2[backbone.3]"``, see :func:`~lit_partial.callbacks._freezing_schedule.group_names`),
        ``"frozen"`` what the schedule never unfreezes. What is frozen at the
        start is what ``frozen`` selects plus whatever else does not require gradients when the groups are
        planned (e.g. a PEFT model's frozen base weights), so a schedule entry unfreezing those keeps its
        ``lr_scale``. Every parameter of ``model`` is in exactly one group.

        Raises:
            ValueError: If an entry has an ``lr_scale`` but ``defaults`` has no ``lr`` to scale.
        """
        initially_frozen = {n for n, _ in self._params(model, self.frozen)} if self.frozen else set()
        initially_frozen |= {n for n, p in model.named_parameters() if not p.requires_grad}
        phases = [("trainable", [n for n, _ in model.named_parameters() if n not in initially_frozen], 1.0)]
        for entry, name in zip(self.schedule, group_names(self.schedule), strict=True):
            if name is not None:
                phases.append((name, [n for n, _ in self._params(model, entry.unfreeze)], entry.lr_scale))
        return plan_phase_groups(model, phases, defaults)

    # ------------------------------------------------------------------ resume
    @override
    def technique_state(self) -> dict[str, Any]:
        # The model-wide frozen set (other freezing callbacks included), read when the checkpoint is written.
        model = self._trained() if self._trained is not None else None
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad] if model is not None else []
        return {
            "applied": list(self._applied),
            "frozen": frozen,
            "held_norms": sorted(n for n, h in self._held.items() if h),
            "events": list(self._events),
            "applied_eval": list(self._applied_eval),
            "optimizer_layouts": optimizer_layouts(model),
        }

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        if len(state.get("applied", [])) != len(self.schedule):
            raise ConfigurationError(
                f"the checkpoint's LayerFreezing state has {len(state.get('applied', []))} schedule entries, this "
                f"callback {len(self.schedule)}. Fix: resume with the schedule the checkpoint was trained with."
            )
        model = self.model
        if model is None:  # not fitting (e.g. validate with ckpt_path): nothing to restore onto
            return
        params = dict(model.named_parameters())
        unknown = sorted(set(state["frozen"]) - set(params))
        if unknown:
            raise ConfigurationError(
                f"the checkpoint freezes parameters {unknown[:5]} this model does not have; resume the same model."
            )
        frozen = set(state["frozen"])
        for name, p in params.items():
            set_requires_grad([p], name not in frozen)
        self._sync.changed()
        reload_sharded_optimizer_state(model)
        held = set(state["held_norms"])
        self._held = {n: n in held for n, m in model.named_modules() if n and is_running_stats_norm(m)}
        self._held_modules = [model.get_submodule(n) for n, h in self._held.items() if h]
        self._applied = list(state["applied"])
        self._pending = [i for i, done in enumerate(self._applied) if not done]
        self._events = list(state.get("events", []))
        self._applied_eval = list(state.get("applied_eval", [None] * len(self.schedule)))

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._changed_from = None
        states = checkpoint.get("callbacks") or {}
        if not self.accept_config_change or self.state_key in states:
            return
        # Our configuration changed (our state is not there under our key), and we accept it: the groups this run
        # builds may differ from the checkpoint's. Lightning restores the optimizer states from this very dict
        # after on_fit_start, where the groups are built: remap_resumed_groups rewrites them there.
        saved = [
            state
            for state in states.values()
            if isinstance(state, dict)
            and "optimizer_layouts" in state
            and state.get("lit_partial", {}).get("technique") == type(self).__qualname__
        ]
        self._changed_from = (checkpoint, saved[0]["optimizer_layouts"] if saved else [])
        if trainer.strategy.restore_checkpoint_after_setup:  # the optimizers exist already (on_fit_start has run)
            self._changed_from = remap_resumed_groups(trainer, pl_module, self._changed_from)
