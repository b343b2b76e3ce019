"""``ActivationDetach``: cut, recompute or offload activations of selected modules during training steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lit_partial._plain import to_plain
from lit_partial.conditions import Always, Condition, StepContext, parse_condition
from lit_partial.distributed import allow_unused_parameters, check_supported_strategy
from lit_partial.functional.activation_cuts import Handles, checkpoint_modules, detach_outputs, offload_modules
from lit_partial.selection import Selectors, as_selector_list, select_modules

__all__ = ["ActivationDetach"]


def _first_tensor(value: Any) -> Any:
    """The tensor a statistic condition looks at: the output itself, or the first tensor inside it."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return next((found for v in value if (found := _first_tensor(v)) is not None), None)
    return value if isinstance(value, torch.Tensor) else None


class ActivationDetach(Callback):
    """Spend less activation memory in training steps: detach, checkpoint or offload selected modules.

    * ``at``: the outputs of these modules are detached, so nothing before them keeps activations for
      backward - exactly what ``h = module(x).detach()`` written in ``forward`` does (the modules and all
      before them get no gradient). A dict ``{selector: condition}`` detaches only while the condition holds
      (see :mod:`lit_partial.conditions`; statistic conditions look at the module's output).
    * ``checkpoint``: these modules keep only their inputs and are recomputed in backward
      (``torch.utils.checkpoint``, non-reentrant, RNG state preserved): gradients are identical to the plain
      run. BatchNorm inside them updates its running statistics once per step (the recomputation's update
      is undone). A module that modifies its input in place raises ``UnsafeCheckpointError`` naming it.
    * ``offload``: the tensors these modules save for backward live in pinned host memory until backward
      (``save_on_cpu``). GPU only: on CPU it warns and does nothing.

    Everything acts only inside training steps: validation, test, predict and direct calls outside the
    trainer run the model untouched. All hooks and patched ``forward`` s are removed at ``teardown``. Under
    DDP, ``at`` makes the strategy use ``find_unused_parameters=True`` (the cut-off parameters get no
    gradient). The callback has no state to save: conditions are functions of the step.

    Args:
        at: Module selectors whose outputs are detached, or ``{selector: condition}``.
        checkpoint: Module selectors to recompute in backward (nested selections use the outermost).
        offload: Module selectors whose saved tensors go to host memory (GPU only).
        segments: With ``checkpoint`` naming an ``nn.Sequential``: checkpoint it as this many consecutive
            pieces, or ``"sqrt"`` for round(sqrt(len)); ``None`` checkpoints each selected module whole.

    Raises:
        ValueError: If no technique is given, or ``segments`` is not a positive int, ``"sqrt"`` or None.
        ConditionError: If a condition in ``at`` is invalid.
        SelectorError: If a selector is malformed (``__init__``) or matches no module (``setup``).

    Example:
        >>> from lit_partial.examples import DigitsClassifier, DigitsDataModule
        >>> cb = ActivationDetach(at="backbone.0", checkpoint=["backbone.1", "backbone.2"])
        >>> trainer = L.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False)  # doctest: +SKIP
        >>> trainer.fit(DigitsClassifier(), DigitsDataModule())  # doctest: +SKIP
    """

    def __init__(
        self,
        at: Selectors | Mapping[str, Any] | None = None,
        checkpoint: Selectors | None = None,
        offload: Selectors | None = None,
        segments: int | str | None = None,
    ) -> None:
        at, checkpoint, offload = to_plain(at), to_plain(checkpoint), to_plain(offload)
        if at is None and checkpoint is None and offload is None:
            raise ValueError(
                "ActivationDetach needs at least one of `at`, `checkpoint`, `offload`, e.g. "
                "ActivationDetach(at='backbone.0') or ActivationDetach(checkpoint='blocks.*')."
            )
        if segments is not None and segments != "sqrt" and (type(segments) is not int or segments < 1):
            raise ValueError(f"`segments` must be a positive int, 'sqrt' or None, got {segments!r}.")
        if segments is not None and checkpoint is None:
            raise ValueError(f"`segments={segments!r}` applies to `checkpoint`, which is not set; set both or neither.")
        self.at: dict[str, Condition] = {}
        if isinstance(at, Mapping):
            if not at:
                raise ValueError("`at` is an empty dict; name at least one module, e.g. {'backbone.0': 'always'}.")
            self.at = {key: parse_condition(spec) for key, spec in at.items()}
            as_selector_list(list(self.at), argument="at")
        elif at is not None:
            self.at = {key: Always() for key in as_selector_list(at, argument="at")}
        self.checkpoint = as_selector_list(checkpoint, argument="checkpoint") if checkpoint is not None else []
        self.offload = as_selector_list(offload, argument="offload") if offload is not None else []
        self.segments = segments
        self._handles = Handles()
        self._active = False
        self._ctx = StepContext()

    def _when(self, name: str, output: Any) -> bool:
        if not self._active:
            return False
        # each selector's condition rules on the modules it selected (first matching selector wins)
        condition = self._conditions.get(name, Always())
        return condition(self._ctx, _first_tensor(output) if condition.needs_activation else None, salt=name)

    def _is_active(self) -> bool:
        return self._active

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported_strategy(trainer, "ActivationDetach")
        self._handles.remove()
        self._conditions: dict[str, Condition] = {}
        for selector, condition in self.at.items():
            for name, _ in select_modules(pl_module, selector):
                self._conditions.setdefault(name, condition)
        checkpointed = [name for name, _ in select_modules(pl_module, self.checkpoint)] if self.checkpoint else []
        offloaded = [name for name, _ in select_modules(pl_module, self.offload)] if self.offload else []
        if self._conditions:
            allow_unused_parameters(trainer, "ActivationDetach", f"outputs of {sorted(self._conditions)} are detached")
            self._handles.add(detach_outputs(pl_module, list(self._conditions), when=self._when).remove)
        if checkpointed:
            handle = checkpoint_modules(pl_module, checkpointed, segments=self.segments, enabled=self._is_active)
            self._handles.add(handle.remove)
        if offloaded:
            if trainer.strategy.root_device.type != "cuda":
                rank_zero_warn(
                    f"ActivationDetach: `offload={self.offload}` keeps saved tensors in host memory, which only saves "
                    f"memory on a GPU; training runs on {trainer.strategy.root_device.type}, so offload does nothing."
                )
                offloaded = []
            else:
                self._handles.add(offload_modules(pl_module, offloaded, enabled=self._is_active).remove)
        rank_zero_info(
            f"ActivationDetach: detach after {sorted(self._conditions)}, checkpoint {checkpointed}, offload {offloaded}"
        )

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ctx = StepContext.from_trainer(trainer, batch_idx)
        self._active = True

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._active = False

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._active = False

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._active = False
        self._handles.remove()
