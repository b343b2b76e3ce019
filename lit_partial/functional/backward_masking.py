"""Mask each gradient the moment autograd has finished accumulating it, while it is still in cache.

:func:`~lit_partial.functional.masking.mask_gradients` at the optimizer step reads every masked gradient back
from memory after the whole backward has pushed it out of cache: one more pass over gradients and masks.
:func:`mask_gradients_in_backward` does the same bit-select in a ``register_post_accumulate_grad_hook``, right
after autograd wrote the gradient, and stamps it (the gradient tensor and its version counter). At the step,
:meth:`BackwardMasks.settled` tells which gradients are still exactly as masked (same tensor, not written in
place since), so only the others need :func:`~lit_partial.functional.masking.mask_gradients`. Nothing is
trusted that was not seen: a gradient assigned or written in place after the backward (an AMP unscale, DDP's
all-reduce, a user's hook) is masked again at the step.

Under gradient accumulation the hook runs after every micro-batch's accumulation: each pass is in cache, and
the last one leaves the final gradient masked. Selecting bits commutes with summing (a masked entry is 0 after
every micro-batch), so the result equals masking once at the end, bit for bit.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> masks = mask_gradients_in_backward([(w, torch.tensor([True, False, True]))])
    >>> (w * torch.tensor([1.0, float("nan"), 3.0])).sum().backward()
    >>> w.grad, masks.settled(w)
    (tensor([1., 0., 3.]), True)
    >>> w.grad.mul_(2)  # written after the backward: no longer vouched for
    tensor([2., 0., 6.])
    >>> masks.settled(w)
    False
    >>> masks.remove()
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lit_partial._compat import version_counter
from lit_partial.attach import Handle, Handles
from lit_partial.distributed import is_dtensor
from lit_partial.errors import UsageError
from lit_partial.functional.masking import _as_01, _bits, _fit, kernel_mask

__all__ = ["BackwardMasks", "mask_gradients_in_backward"]

MaskOf = Tensor | Callable[[], Tensor | None]


class BackwardMasks:
    """The post-accumulate-grad hooks of :func:`mask_gradients_in_backward` and what they masked."""

    def __init__(self) -> None:
        self._stamps: dict[int, tuple[weakref.ref[Tensor], int]] = {}  # id(param) -> (its masked grad, version)
        self._handles = Handles([Handle(self._stamps.clear)])
        self.passes = 0  #: gradients masked by the hooks so far (a counter for tests and benchmarks)

    def settled(self, param: Tensor) -> bool:
        """Whether ``param.grad`` is the tensor a hook masked, not written in place since (no pass needed)."""
        stamp = self._stamps.get(id(param))
        grad = param.grad
        return stamp is not None and grad is not None and stamp[0]() is grad and version_counter(grad) == stamp[1]

    def remove(self) -> None:
        """Remove every hook and forget the stamps; calling it twice is harmless."""
        self._handles.remove()

    def _hook(self, mask_of: Callable[[], Tensor | None]) -> Callable[[Tensor], None]:
        stamps = self._stamps

        def after_accumulation(param: Tensor) -> None:
            grad, keep = param.grad, mask_of()
            if grad is None or keep is None or grad.is_sparse or grad.layout != torch.strided:
                return  # left to the step-time pass (which also names what is wrong with a sparse gradient)
            with torch.no_grad():
                bits = _bits(grad)
                torch.mul(bits, _fit(_as_01(keep), bits), out=bits)
            stamps[id(param)] = (weakref.ref(grad), version_counter(grad))
            self.passes += 1

        return after_accumulation


def mask_gradients_in_backward(pairs: Iterable[tuple[Tensor, MaskOf]]) -> BackwardMasks:
    """Zero each parameter's masked gradient entries as soon as autograd has accumulated them (NaN/inf included).

    Args:
        pairs: ``(param, mask)``: the mask as a tensor (bool or 0/1; converted once with
            :func:`~lit_partial.functional.masking.kernel_mask`), or a callable returning the current one (bool or
            ``kernel_mask``'s forms; None skips), read at every hook call, so masks may be replaced.
            Parameters must be plain tensors that autograd accumulates into (not FSDP2's sharded ``DTensor`` s,
            whose gradients arrive by reduce-scatter).

    Returns:
        A :class:`BackwardMasks`: ``settled(param)`` says whether a step-time pass can be skipped, ``remove()``
        removes the hooks.

    Raises:
        UsageError: For a parameter that does not require gradients, or a sharded (``DTensor``) one.
    """
    masks = BackwardMasks()
    for param, mask in pairs:
        if not param.requires_grad:
            raise UsageError(
                f"mask_gradients_in_backward got a parameter of shape {tuple(param.shape)} that does not require "
                "gradients; autograd never accumulates into it. Fix: pass only trainable parameters."
            )
        if is_dtensor(param):
            raise UsageError(
                "mask_gradients_in_backward got a sharded (DTensor) parameter, whose gradient is reduce-scattered, "
                "not accumulated. Fix: mask its gradient at the step with mask_gradients."
            )
        mask_of = _constant(kernel_mask(mask, param)) if isinstance(mask, Tensor) else mask
        hook = masks._hook(mask_of)
        masks._handles.add(param.register_post_accumulate_grad_hook(hook))  # type: ignore[no-untyped-call]  # untyped in torch
    return masks


def _constant(mask: Tensor) -> Callable[[], Tensor | None]:
    return lambda: mask
