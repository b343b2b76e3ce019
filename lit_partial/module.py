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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lit_partial.summary import format_summary, summarize

__all__ = [
    "ParamGroupPlanner",
    "PartialBackpropMixin",
    "PartialState",
    "partial_state",
    "register_batch_transform",
    "register_gate",
]

GateFn = Callable[[Any], Any]
BatchTransform = Callable[[Any, int], Any]

_STATE_ATTR = "_lit_partial_state"

# The mixin overrides on_after_batch_transfer only to run registered transforms; Lightning warns about any
# override when a DataModule is used, which would fire for every mixin user and means nothing here.
warnings.filterwarnings(
    "ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule` but have passed"
)


@dataclass
class PartialState:
    """What callbacks have attached to one model; lives on the model, never in its ``state_dict``.

    Attributes:
        gates: gate name -> ordered ``{handle_id: fn}``; :meth:`PartialBackpropMixin.gate` applies them in order.
        seen_gates: gate names that ran since the set was last cleared (callbacks validate their gate names).
        batch_transforms: ``{handle_id: fn(batch, dataloader_idx) -> batch}``, applied after batch transfer.
        masked: parameter name -> number of masked elements, for :func:`lit_partial.summary.summarize`.
    """

    gates: dict[str, OrderedDict[int, GateFn]] = field(default_factory=dict)
    seen_gates: set[str] = field(default_factory=set)
    batch_transforms: OrderedDict[int, BatchTransform] = field(default_factory=OrderedDict)
    masked: dict[str, int] = field(default_factory=dict)


def partial_state(model: nn.Module) -> PartialState:
    """The :class:`PartialState` of ``model``, created on first use (works for any ``nn.Module``)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        state = PartialState()
        model.__dict__[_STATE_ATTR] = state
    return state


def register_gate(model: nn.Module, name: str, fn: GateFn) -> RemovableHandle:
    """Make ``model.gate(name, x)`` return ``fn(x)`` until the returned handle is removed.

    Several functions on one name compose in registration order.
    """
    hooks = partial_state(model).gates.setdefault(name, OrderedDict())
    handle = RemovableHandle(hooks)
    hooks[handle.id] = fn
    return handle


def register_batch_transform(model: nn.Module, fn: BatchTransform) -> RemovableHandle:
    """Replace every batch by ``fn(batch, dataloader_idx)`` after it reaches the device (mixin models only).

    The function sees training, validation, test and predict batches; it decides itself when to act
    (e.g. only while ``model.trainer.training``).

    Raises:
        TypeError: If ``model`` does not inherit :class:`PartialBackpropMixin`.
    """
    if not isinstance(model, PartialBackpropMixin):
        raise TypeError(
            f"{type(model).__name__} cannot have its batches replaced: a Lightning callback cannot reach the batch. "
            f"Fix: declare `class {type(model).__name__}(PartialBackpropMixin, L.LightningModule)`."
        )
    transforms = partial_state(model).batch_transforms
    handle = RemovableHandle(transforms)
    transforms[handle.id] = fn
    return handle


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

    def gate(self, name: str, x: Any) -> Any:
        """A named point in ``forward``: returns ``x`` unchanged unless a callback rules on ``name``.

        Args:
            name: The gate name callbacks refer to (e.g. ``ConditionalDetach({"features": ...})``).
            x: A tensor, or a tuple/dict of tensors, as the callback's rule supports.
        """
        state = partial_state(self)  # type: ignore[arg-type]
        state.seen_gates.add(name)
        for fn in state.gates.get(name, {}).values():
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

    def partial_param_groups(self, **defaults: Any) -> list[dict[str, Any]]:
        """Optimizer parameter groups planned by the attached callbacks; pass them to your optimizer.

        Without a planning callback this is one group holding every parameter (frozen ones included:
        they get no gradient, so optimizers leave them alone). With ``LayerFreezing`` it is one group
        per schedule phase, all present from the start, so LR schedulers see every group.

        Args:
            **defaults: Optimizer options for every group, e.g. ``lr=1e-3``.

        Example:
            >>> def configure_optimizers(self):  # doctest: +SKIP
            ...     return torch.optim.AdamW(self.partial_param_groups(lr=1e-3))
        """
        trainer = getattr(self, "_trainer", None)
        planners = [
            cb for cb in (trainer.callbacks if trainer is not None else []) if isinstance(cb, ParamGroupPlanner)
        ]
        if len(planners) > 1:
            names = ", ".join(type(cb).__name__ for cb in planners)
            raise ValueError(f"several callbacks plan parameter groups ({names}); keep one of them.")
        if planners:
            return planners[0].plan_param_groups(self, dict(defaults))  # type: ignore[arg-type]
        return [{"params": list(self.parameters()), "name": "all", **defaults}]  # type: ignore[attr-defined]

    def partial_summary(self) -> str:
        """A table per top-level module: parameters total, trainable (``requires_grad``) and masked."""
        return format_summary(summarize(self))  # type: ignore[arg-type]

    def tbptt_step(self, batch: Any, k: int, step_fn: Callable[[Any, Any], Any], **kwargs: Any) -> Tensor | None:
        """Truncated backprop through time over ``batch`` in chunks of ``k`` steps; returns the mean chunk loss.

        Call it from ``training_step`` with ``self.automatic_optimization = False``; ``step_fn(chunk, hiddens)``
        returns ``(loss, hiddens)``. Options (``accumulate``, ``hiddens``, ``time_dim``) and details:
        :func:`lit_partial.tbptt.tbptt_training_step`.

        Example:
            >>> def training_step(self, batch, batch_idx):  # doctest: +SKIP
            ...     return self.tbptt_step(batch, k=4, step_fn=self.chunk_step)
        """
        from lit_partial.tbptt import tbptt_training_step  # the logic lives in tbptt.py

        return tbptt_training_step(self, batch, k, step_fn, **kwargs)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Apply the batch transforms callbacks registered (e.g. ``SelectiveBackprop``) after ``super()``'s."""
        batch = super().on_after_batch_transfer(batch, dataloader_idx)  # type: ignore[misc]
        for fn in partial_state(self).batch_transforms.values():  # type: ignore[arg-type]
            batch = fn(batch, dataloader_idx)
        return batch
