"""``PartialBackpropMixin``: the module-side seams that a Lightning callback cannot reach.

A callback holds policy; some policies must act inside the LightningModule: rule on a named point of
``forward`` (:meth:`PartialBackpropMixin.gate`), replace the batch before ``training_step``
(:func:`register_batch_transform`), score samples (:meth:`PartialBackpropMixin.per_sample_loss`) and plan
optimizer parameter groups for a whole schedule (:meth:`PartialBackpropMixin.partial_param_groups`).

Callbacks attach to these seams through :func:`register_gate` and :func:`register_batch_transform`, which
return removable handles, exactly like ``torch.nn.Module.register_forward_hook``.

Example:
    >>> import lightning as L, torch
    >>> class Net(PartialBackpropMixin, L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.backbone, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    ...     def forward(self, x):
    ...         return self.head(self.gate("features", self.backbone(x)))
    >>> net = Net()
    >>> handle = register_gate(net, "features", lambda h: h.detach())
    >>> net(torch.randn(3, 4)).shape
    torch.Size([3, 2])
    >>> handle.remove()
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn

from lit_partial._checkpoint import check_checkpoint_techniques, claim_legacy_states, is_technique
from lit_partial.errors import ConfigurationError
from lit_partial.functional.token_selection import masked_token_mean
from lit_partial.handles import (
    batch_transforms,
    gate_functions,
    record_gate,
    register_batch_transform,
    register_gate,
)
from lit_partial.summary import format_summary, summarize, tie_notes
from lit_partial.tbptt import tbptt_training_step

__all__ = [
    "TOKEN_LOSS_GATE",
    "ParamGroupPlanner",
    "PartialBackpropMixin",
    "attached_trainer",
    "register_batch_transform",
    "register_gate",
]

# The mixin overrides on_after_batch_transfer only to run registered transforms; Lightning warns about any
# override when a DataModule is used, which would fire for every mixin user and means nothing here.
warnings.filterwarnings(
    "ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule` but have passed"
)

#: The gate through which :meth:`PartialBackpropMixin.token_loss` hands per-token losses to ``TokenSelection``.
TOKEN_LOSS_GATE = "lit_partial.token_loss"


def attached_trainer(model: nn.Module) -> Any:
    """The Lightning ``Trainer`` ``model`` is attached to, or None (``LightningModule.trainer`` raises instead)."""
    try:
        return model.trainer
    except (AttributeError, RuntimeError):
        return None


@runtime_checkable
class ParamGroupPlanner(Protocol):
    """A callback that plans optimizer parameter groups for its whole schedule (e.g. ``LayerFreezing``)."""

    def plan_param_groups(self, model: nn.Module, defaults: dict[str, Any]) -> list[dict[str, Any]]:
        """Return parameter groups covering every parameter of ``model``, each with ``defaults`` applied."""
        ...


class PartialBackpropMixin:
    """Mixin for ``LightningModule`` s that gives lit_partial callbacks their module-side seams.

    Put it first in the bases, ``class Net(PartialBackpropMixin, L.LightningModule)``, and call
    ``super()`` in any ``on_after_batch_transfer`` you override. It adds no ``__init__`` and no state to
    the checkpoint, so it cooperates with any ``super().__init__()`` chain.
    """

    #: Tells :func:`register_batch_transform` that this class runs them (``lit_partial.handles`` imports no mixin).
    __lit_partial_batch_transforms__: ClassVar[bool] = True

    def gate(self, name: str, x: Any) -> Any:
        """A named point in ``forward``: returns ``x`` unchanged unless a callback rules on ``name``.

        Args:
            name: The gate name callbacks refer to (e.g. ``ConditionalDetach({"features": ...})``).
            x: A tensor, or a tuple/dict of tensors, as the callback's rule supports.
        """
        record_gate(self, name)  # type: ignore[arg-type]  # a mixin: self is the LightningModule
        for fn in gate_functions(self, name):  # type: ignore[arg-type]  # a mixin: self is the module
            x = fn(x)
        return x

    def per_sample_loss(self, batch: Any) -> Tensor:
        """The loss of every sample in ``batch``, shape ``(B,)``, with gradient.

        Override it to use ``SelectiveBackprop`` (which scores samples with it); ``training_step`` may
        call it too, e.g. ``return self.per_sample_loss(batch).mean()``.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.per_sample_loss(batch) is not implemented; SelectiveBackprop needs it to score "
            "samples. Fix: return the unreduced loss, e.g. `F.cross_entropy(self(x), y, reduction='none')`."
        )

    def token_loss(self, losses: Tensor, valid: Tensor, batch: Any = None) -> Tensor:
        """Reduce per-token losses ``(B, T)`` to the loss to backpropagate (the per-token loss seam).

        The mean over the ``valid`` tokens (labels other than ``-100``); with ``TokenSelection`` attached, over the
        tokens it keeps in training steps. Call it from ``training_step`` with the output of
        :func:`lit_partial.functional.token_selection.token_losses`; pass ``batch`` when the selection needs a
        reference (a reference model's inputs or a batch key of precomputed reference losses).

        Example:
            >>> import torch
            >>> PartialBackpropMixin().token_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[True, False]]))
            tensor(1.)
        """
        for fn in gate_functions(self, TOKEN_LOSS_GATE):  # type: ignore[arg-type]  # a mixin: self is the module
            return fn((losses, valid, batch))  # type: ignore[no-any-return]  # one TokenSelection at most
        return masked_token_mean(losses, valid)

    def partial_param_groups(self, **defaults: Any) -> list[dict[str, Any]]:
        """Optimizer parameter groups planned by the attached callbacks; pass them to your optimizer.

        Without a planning callback this is one group holding every parameter (frozen ones included:
        they get no gradient, so optimizers leave them alone). With ``LayerFreezing`` it is one group
        per schedule phase, all present from the start, so LR schedulers see every group.

        Args:
            **defaults: Optimizer options for every group, e.g. ``lr=1e-3``.

        Example:
            >>> import lightning as L, torch
            >>> from lit_partial.demos import DigitsClassifier
            >>> class Net(DigitsClassifier):  # a PartialBackpropMixin LightningModule
            ...     def configure_optimizers(self):
            ...         return torch.optim.AdamW(self.partial_param_groups(lr=1e-3))
            >>> [(len(group["params"]), group["lr"]) for group in Net().partial_param_groups(lr=1e-3)]  # no trainer
            [(11, 0.001)]
        """
        trainer = attached_trainer(self)  # type: ignore[arg-type]  # a mixin: self is the LightningModule
        planners = [
            cb for cb in (trainer.callbacks if trainer is not None else []) if isinstance(cb, ParamGroupPlanner)
        ]
        if len(planners) > 1:
            names = ", ".join(type(cb).__name__ for cb in planners)
            raise ConfigurationError(f"several callbacks plan parameter groups ({names}); keep one of them.")
        if planners:
            return planners[0].plan_param_groups(self, dict(defaults))  # type: ignore[arg-type]  # mixin: self is the module
        return [{"params": list(self.parameters()), "name": "all", **defaults}]  # type: ignore[attr-defined]  # mixin

    def partial_summary(self, depth: int = 1) -> str:
        """A table per module: parameters total, trainable (``requires_grad``) and masked, then tied parameters.

        Args:
            depth: Branching levels to show. Wrappers with a single child (``self.model``, PEFT's
                ``base_model.model``, ``_orig_mod``) are looked through, so ``depth=1`` is the first level where
                the model has several parts, e.g. ``model.base_model.model.model`` and ``...lm_head`` for a
                PEFT-wrapped causal LM, ``depth=3`` its ``layers.0``, ``layers.1``, ... Row names are selectors.
        """
        return format_summary(summarize(self, depth), tie_notes(self, depth))  # type: ignore[arg-type]  # mixin

    def tbptt_step(self, batch: Any, k: int, step_fn: Callable[[Any, Any], Any], **kwargs: Any) -> Tensor | None:
        """Truncated backprop through time over ``batch`` in chunks of ``k`` steps; returns the mean chunk loss.

        Call it from ``training_step`` with ``self.automatic_optimization = False``; ``step_fn(chunk, hiddens)``
        returns ``(loss, hiddens)``. Options (``accumulate``, ``hiddens``, ``time_dim``) and details:
        :func:`lit_partial.tbptt.tbptt_training_step`.

        Example:
            >>> import lightning as L
            >>> from lit_partial.demos import DigitsDataModule, DigitsRNN
            >>> model = DigitsRNN(tbptt_steps=4)  # its training_step: self.tbptt_step(batch, k=4, step_fn=...)
            >>> trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            ...                     enable_model_summary=False, limit_val_batches=0)
            >>> trainer.fit(model, DigitsDataModule(sequence=True))
            >>> trainer.global_step  # optimizer steps: one per chunk of 4 rows, 2 per batch of 8-row digits
            2
        """
        return tbptt_training_step(self, batch, k, step_fn, **kwargs)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Apply the batch transforms callbacks registered (e.g. ``SelectiveBackprop``) after ``super()``'s."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]  # mixin: LightningModule next
        for fn in batch_transforms(self):  # type: ignore[arg-type]  # a mixin: self is the module
            batch = fn(batch, dataloader_idx)
        return batch

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint holding the state of a lit_partial technique this run no longer has.

        Techniques check this themselves on resume; this covers runs from which every technique was removed.
        Call ``super().on_load_checkpoint(checkpoint)`` if you override it.

        Raises:
            CheckpointMismatchError: Naming the technique whose state would be dropped and the fix.
        """
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]  # mixin: LightningModule next
        trainer = attached_trainer(self)  # type: ignore[arg-type]  # a mixin: self is the LightningModule
        techniques = [cb for cb in (trainer.callbacks if trainer is not None else []) if is_technique(cb)]
        # Runs before any callback hook: states saved under a legacy key reach their technique without a warning.
        claim_legacy_states(checkpoint, techniques)
        if not techniques:
            check_checkpoint_techniques(checkpoint, [])
