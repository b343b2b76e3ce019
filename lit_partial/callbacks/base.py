"""``Technique``: the public base every lit_partial callback builds on.

A technique is a Lightning callback that changes what takes part in backpropagation. The base owns what
every technique needs and none should write again:

* **Stage guard and strategy check.** :meth:`Technique.setup` acts for ``fit`` only and refuses, before
  anything runs, a strategy outside :attr:`Technique.supported_strategies` (families from
  :func:`lit_partial.distributed.strategy_family`), naming it and the fix. Then it calls :meth:`attach`.
* **When the model is ready.** ``setup`` (and so :meth:`attach`) runs before ``configure_model``: under DDP
  that is the last point before the model is wrapped, but under FSDP2 (``ModelParallelStrategy``)
  ``fully_shard`` has not yet replaced the parameters by sharded ``DTensor`` parameters. Modules, names and
  hooks survive sharding; parameter *objects* do not, so a technique that holds parameters resolves them again
  in ``on_fit_start`` (the strategy has set up the model and the optimizers by then) when
  :func:`lit_partial.distributed.is_sharded` says so. A checkpoint's state reaches :meth:`load_technique_state`
  before ``on_fit_start`` under DDP, after it under FSDP2.
* **Handles.** Everything :meth:`attach` puts on the model (forward hooks, forward wrappers, gates, batch
  transforms, optimizer hooks) goes into :attr:`Technique.handles`; ``teardown`` and ``on_exception`` remove
  it last-first, so after ``fit`` (or a failed ``fit``) every module is exactly as it was.
* **Resume.** :meth:`state_dict` stores :meth:`config` (the plain-data configuration the state depends on)
  beside :meth:`technique_state`. On resume, a checkpoint holding the state of a technique this run does not
  have (removed, or configured differently: ``state_key`` is built from the configuration, as in Lightning's
  own callbacks) is refused with a :class:`~lit_partial.errors.CheckpointMismatchError` naming what changed,
  and so is a saved configuration that differs under the same key. ``accept_config_change=True`` discards the
  old state instead, with a warning, and applies the new configuration from the resumed step.
  The configuration is the validated user spec as plain data; checkpoints written when it was ``repr()`` of
  internal objects still resume through :meth:`Technique.legacy_config` (see :mod:`lit_partial._checkpoint`).
* **Reporting.** :meth:`run_summary` says what the technique did over the run, in a few lines.

See ``docs/adding_a_technique.md`` for a worked example.

Example:
    >>> class CountSteps(Technique):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.steps = 0
    ...     def config(self):
    ...         return {}
    ...     def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
    ...         self.steps += 1
    ...     def technique_state(self):
    ...         return {"steps": self.steps}
    ...     def load_technique_state(self, state):
    ...         self.steps = state["steps"]
    >>> cb = CountSteps()
    >>> cb.state_key, sorted(cb.state_dict())
    ('CountSteps', ['lit_partial', 'steps'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_partial._checkpoint import (
    MARK,
    check_checkpoint_techniques,
    claim_legacy_states,
    differences,
    is_technique,
    jsonable,
    state_key,
)
from lit_partial.distributed import DEFAULT_FAMILIES, check_supported_strategy
from lit_partial.errors import CheckpointMismatchError, ConfigurationError
from lit_partial.handles import Handles
from lit_partial.selection import gc_paused

__all__ = ["Technique", "check_checkpoint_techniques"]


class Technique(Callback):
    """Base class of lit_partial callbacks: stage guard, strategy check, handles, resume checks, reporting.

    Subclasses implement :meth:`config` and usually :meth:`attach`; stateful ones :meth:`technique_state` and
    :meth:`load_technique_state`. They call ``super().__init__(accept_config_change=...)``.

    Args:
        accept_config_change: Resume from a checkpoint made with a different configuration of this technique
            (or holding another instance of its class that this run lacks): the saved state is discarded with
            a warning and this configuration applies from the resumed step. Default: such a resume is an error.
    """

    #: Strategy families (see :func:`lit_partial.distributed.strategy_family`) this technique is correct under.
    supported_strategies: ClassVar[tuple[str, ...]] = DEFAULT_FAMILIES

    def __init__(self, *, accept_config_change: bool = False) -> None:
        if not isinstance(accept_config_change, bool):
            raise ConfigurationError(f"`accept_config_change` must be True or False, got {accept_config_change!r}.")
        self.accept_config_change = accept_config_change
        #: What :meth:`attach` attached; removed last-first at teardown and on exceptions.
        self.handles = Handles()
        self._model: nn.Module | None = None

    # ---------------------------------------------------------------- what subclasses provide
    def config(self) -> dict[str, Any]:
        """The configuration the saved state depends on, as plain data (compared on resume)."""
        raise NotImplementedError(f"{type(self).__name__}.config() must return its configuration as plain data.")

    def identity(self) -> dict[str, Any]:
        """What tells two instances of this technique apart in one trainer; ``state_key`` is built from it.

        By default the whole :meth:`config`, as Lightning's own callbacks do: two instances with different
        configurations coexist, and a checkpoint made with another configuration is found to hold an
        unclaimed state, which resuming refuses naming both configurations.
        """
        return self.config()

    def legacy_config(self) -> dict[str, Any] | None:
        """The configuration as checkpoints written before it was plain data recorded it, where that differs.

        ``None`` (the default): the same as :meth:`config`. A technique whose configuration was once recorded as
        ``repr()`` of internal objects returns that form here, so those checkpoints still resume.
        """
        return None

    def legacy_identity(self) -> dict[str, Any] | None:
        """What :meth:`identity` was in checkpoints written before :meth:`config` was plain data (None: the same)."""
        return self.legacy_config()

    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resolve selectors against ``pl_module`` and attach hooks; put every handle in :attr:`handles`."""

    def detach(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        """Extra cleanup beyond :attr:`handles` (called after they are removed, at teardown or on exception)."""

    def technique_state(self) -> dict[str, Any]:
        """What this technique must save to resume exactly, keyed by names (never objects)."""
        return {}

    def load_technique_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`technique_state` returned (read optional keys with ``.get``)."""

    def run_summary(self) -> list[str]:
        """What the technique did over the run, as a few human-readable lines (for logs and reports)."""
        return []

    # ---------------------------------------------------------------- the contract
    @property
    def model(self) -> nn.Module | None:
        """The LightningModule this technique is attached to (between ``setup`` and ``teardown``), else None."""
        return self._model

    @property
    @override
    def state_key(self) -> str:
        return state_key(type(self).__qualname__, self.identity())

    @property
    def legacy_state_key(self) -> str | None:
        """The ``state_key`` checkpoints written before :meth:`config` was plain data used (None: the same)."""
        identity = self.legacy_identity()
        return None if identity is None else state_key(type(self).__qualname__, identity)

    def technique_record(self) -> dict[str, Any]:
        """The record saved beside the technique's state: its class and its configuration (plain data)."""
        return {"technique": type(self).__qualname__, "config": jsonable(self.config())}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported_strategy(trainer, type(self).__name__, self.supported_strategies)
        self._unwind(trainer, pl_module)  # a second fit() with the same callback starts clean
        self._model = pl_module
        with gc_paused():  # linear in model size (see gc_paused)
            self.attach(trainer, pl_module)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._unwind(trainer, pl_module)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Lightning calls no teardown hook after an exception: unwind here so a failed fit leaves the model clean.
        self._unwind(trainer, pl_module)

    def _unwind(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        self.handles.remove()
        self.detach(trainer, pl_module)
        self._model = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {MARK: self.technique_record(), **self.technique_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        record = state_dict.get(MARK)
        if isinstance(record, Mapping):  # checkpoints from before the record existed load unchecked
            saved = record.get("config", {})
            changes = differences(saved, jsonable(self.config()))
            legacy = self.legacy_config()
            if changes and legacy is not None and saved == jsonable(legacy):
                changes = ""  # written before configurations were plain data, with this configuration
            if changes:
                if not self.accept_config_change:
                    raise CheckpointMismatchError(
                        f"{self.state_key}: the checkpoint was made with a different configuration ({changes}). "
                        f"Fix: resume with the configuration the checkpoint was made with, or pass "
                        f"accept_config_change=True to {type(self).__name__} to discard its saved state and apply "
                        "the new configuration from the resumed step."
                    )
                rank_zero_warn(
                    f"{self.state_key}: configuration changed since the checkpoint ({changes}); its saved "
                    "state is discarded (accept_config_change=True)."
                )
                return
        self.load_technique_state({k: v for k, v in state_dict.items() if k != MARK})

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        techniques = [cb for cb in trainer.callbacks if is_technique(cb)]  # type: ignore[attr-defined]  # untyped in Lightning
        if techniques and techniques[0] is self:  # one check per resume is enough
            claim_legacy_states(checkpoint, techniques)
            check_checkpoint_techniques(checkpoint, techniques)
