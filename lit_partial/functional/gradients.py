"""Custom gradients: cut, scale, reverse or replace the gradient through a tensor, whole or per batch row.

Every function leaves the forward value bit-identical and changes only what flows backward. They accept a
tensor or any structure :mod:`lit_partial.tree` handles (tuples, lists, dicts, dataclasses, ...), so they
apply to any module's output.

Example:
    >>> import torch
    >>> x = torch.ones(2, 3, requires_grad=True)
    >>> scale_grad(x, 0.5).sum().backward()
    >>> x.grad[0]
    tensor([0.5000, 0.5000, 0.5000])
    >>> y = torch.tensor([0.3, 1.7], requires_grad=True)
    >>> out = straight_through(y.round(), y)  # forward rounds, backward is the identity
    >>> out.tolist(), torch.autograd.grad(out.sum(), y)[0].tolist()
    ([0.0, 2.0], [1.0, 1.0])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lit_partial.errors import ConfigurationError, UnsupportedStructureError
from lit_partial.tree import first_tensor, leaves, map_tensors, rebuild

__all__ = [
    "apply_to_tensors",
    "detach_if",
    "first_tensor",
    "reverse_grad",
    "scale_grad",
    "skip_rows",
    "straight_through",
]


def apply_to_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every floating-point (or complex) tensor in ``x``; other leaves pass through unchanged.

    Containers keep their type (see :func:`lit_partial.tree.map_tensors`).
    """
    return map_tensors(x, lambda t: fn(t) if t.is_floating_point() or t.is_complex() else t)


def _rows(mask: Tensor, x: Tensor) -> Tensor:
    # A (B,) mask broadcast over the remaining dims of a (B, ...) tensor.
    if x.dim() == 0 or x.shape[0] != mask.shape[0]:
        raise ConfigurationError(
            f"a per-sample mask of {mask.shape[0]} rows cannot apply to a tensor of shape {tuple(x.shape)}; "
            "per-sample rules need outputs whose first dimension is the batch."
        )
    return mask.to(x.device).view(-1, *([1] * (x.dim() - 1)))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by a float or a per-row factor."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float | Tensor) -> Tensor:
        ctx.scale = scale
        # A copy, not a view: a view made inside a Function may not be modified in place (inplace ReLU after it).
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        scale = ctx.scale
        if isinstance(scale, Tensor):
            scale = _rows(scale, grad).to(grad.dtype)
        return grad * scale, None


def scale_grad(x: Any, scale: float | Tensor) -> Any:
    """Forward ``x`` unchanged; multiply the gradient flowing back through it by ``scale``.

    ``scale=0`` cuts the gradient (the graph stays connected, so upstream parameters get zero gradients),
    ``scale=-1`` reverses it (:func:`reverse_grad`), and a ``(B,)`` tensor scales each batch row on its own.

    Args:
        x: A tensor or a tuple/list/dict of tensors.
        scale: A finite number, or a tensor of shape ``(B,)`` with one factor per batch row.

    Raises:
        ValueError: If ``scale`` is a non-finite number.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> scale_grad(x, torch.tensor([1.0, 0.0])).sum().backward()
        >>> x.grad
        tensor([1., 0.])
    """
    if not isinstance(scale, Tensor):
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise ConfigurationError(f"`scale` must be a finite number or a (B,) tensor, got {scale!r}.")
        if scale == 1:
            return x
    # autograd.Function.apply is untyped in torch's stubs
    return apply_to_tensors(x, lambda t: _ScaleGrad.apply(t, scale) if t.requires_grad else t)  # type: ignore[no-untyped-call]  # Function.apply


def reverse_grad(x: Any, scale: float = 1.0) -> Any:
    """Forward ``x`` unchanged; reverse (and scale) the gradient: the gradient reversal layer of DANN.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> reverse_grad(x, 0.1).sum().backward()
        >>> x.grad
        tensor([-0.1000, -0.1000])
    """
    return scale_grad(x, -float(scale))


def detach_if(x: Any, cond: bool | Tensor) -> Any:
    """Detach ``x`` when ``cond`` holds; with a ``(B,)`` bool tensor, detach only the rows where it is True.

    The forward value never changes. A whole detach cuts the graph (nothing upstream gets a gradient and its
    backward is not computed); a per-row detach keeps the graph, with zero gradient for the detached rows.

    Args:
        x: A tensor or a tuple/list/dict of tensors.
        cond: A bool, or a bool tensor of shape ``(B,)`` (one entry per batch row).

    Example:
        >>> x = torch.ones(3, 2, requires_grad=True)
        >>> detach_if(x, torch.tensor([True, False, True])).sum().backward()
        >>> x.grad[:, 0]
        tensor([0., 1., 0.])
    """
    if isinstance(cond, Tensor):
        if cond.dim() != 1 or cond.dtype != torch.bool:
            raise ConfigurationError(
                f"`cond` must be a bool or a 1-D bool tensor (one entry per batch row), got a {cond.dtype} tensor "
                f"of shape {tuple(cond.shape)}."
            )
        if not torch.compiler.is_compiling() and not bool(cond.any()):  # compiled: no host sync; where() is exact
            return x
        return apply_to_tensors(x, lambda t: torch.where(_rows(cond, t), t.detach(), t) if t.requires_grad else t)
    return apply_to_tensors(x, Tensor.detach) if cond else x


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``hard``; backward hands the whole gradient to ``soft``."""

    @staticmethod
    def forward(ctx: Any, hard: Tensor, soft: Tensor) -> Tensor:
        return hard.to(soft.dtype, copy=True)  # a copy: views made in a Function may not be modified in place

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """The straight-through estimator: the value of ``hard`` forward, the gradient of ``soft`` backward.

    Use it for non-differentiable steps (rounding, quantization, argmax/one-hot, sampling): ``hard`` is the
    discrete value the network uses, ``soft`` its differentiable surrogate. The output equals ``hard`` bit for
    bit (unlike ``soft + (hard - soft).detach()``, which can be off by rounding) and has ``soft``'s dtype.

    Args:
        hard: The forward value (any dtype; cast to ``soft``'s dtype).
        soft: A floating-point tensor of the same shape that receives the gradient unchanged.

    Raises:
        ValueError: If the shapes differ or ``soft`` is not floating point.

    Example:
        >>> logits = torch.tensor([[0.2, 1.5, -0.3]], requires_grad=True)
        >>> probs = logits.softmax(-1)
        >>> one_hot = torch.nn.functional.one_hot(probs.argmax(-1), 3)
        >>> straight_through(one_hot, probs).tolist()
        [[0.0, 1.0, 0.0]]
    """
    if hard.shape != soft.shape:
        raise ConfigurationError(
            f"straight_through needs `hard` and `soft` of the same shape, got {tuple(hard.shape)} and "
            f"{tuple(soft.shape)}; broadcast or reshape `hard` first."
        )
    if not soft.is_floating_point():
        raise ConfigurationError(
            f"`soft` must be a floating-point tensor (it receives the gradient), got {soft.dtype}."
        )
    return _StraightThrough.apply(hard.detach(), soft)  # type: ignore[no-any-return,no-untyped-call]  # untyped in torch


def skip_rows(x: Any, out: Any, mask: Tensor) -> Any:
    """Per-sample skip of a residual-style module: rows where ``mask`` is True take ``x``, the others ``out``.

    ``x`` and ``out`` are the module's input and output with the same structure and shapes (tensors, or
    any structure of them, matched leaf by leaf in traversal order). Skipped rows get no gradient through
    the module.

    Raises:
        UnsupportedStructureError: If ``x`` and ``out`` hold different numbers of tensors.

    Example:
        >>> skip_rows(torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([True, False]))
        tensor([[0., 0.],
                [1., 1.]])
    """
    ins, outs = leaves(x), leaves(out)
    if len(ins) != len(outs):
        raise UnsupportedStructureError(
            f"skip_rows needs an output with the input's structure; the input holds {len(ins)} tensors, the output "
            f"{len(outs)}."
        )
    mixed = [torch.where(_rows(mask, o), i, o) if o.is_floating_point() else o for i, o in zip(ins, outs, strict=True)]
    return rebuild(out, mixed)
