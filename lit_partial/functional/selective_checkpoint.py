"""Selective activation checkpointing: save the outputs of chosen ops, recompute the rest in backward.

Full checkpointing keeps only a module's inputs and recomputes everything; selective checkpointing (PyTorch's
``torch.utils.checkpoint.create_selective_checkpoint_contexts``) keeps the outputs of expensive ops - matrix
products, attention - and recomputes only the cheap pointwise ones, so it spends a little memory to save most of
the recomputation. A *policy* names what is saved:

* ``"matmul"`` (the preset, as torchtitan's op-level SAC): ``mm``, ``addmm``, ``bmm``, ``baddbmm`` and the fused
  attention ops ``scaled_dot_product_attention`` dispatches to;
* a list of op names (``"aten.mm"``, ``"mm"``, ``"aten.addmm.default"``) or ``torch.ops.aten`` ops: saved, the rest
  recomputed;
* a callable ``policy(ctx, op, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy``, used as is.

Example:
    >>> import torch
    >>> from torch.utils.checkpoint import checkpoint
    >>> w = torch.randn(64, 64, requires_grad=True)
    >>> f = lambda x: (x @ w).sin().sin()
    >>> x = torch.randn(32, 64, requires_grad=True)
    >>> plain = live_forward_bytes(lambda: f(x).sum(), exclude=[w, x])
    >>> matmul = selective_context_fn("matmul")
    >>> saved = live_forward_bytes(lambda: checkpoint(f, x, use_reentrant=False, context_fn=matmul).sum(), [w, x])
    >>> full = live_forward_bytes(lambda: checkpoint(f, x, use_reentrant=False).sum(), exclude=[w, x])
    >>> plain, saved, full  # both sin inputs (8 KiB each); the matmul output only; nothing (+ the 4-byte loss)
    (16388, 8196, 4)
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from lit_partial._compat import is_op, sdpa_ops, torch_dispatch_mode
from lit_partial.errors import ConfigurationError
from lit_partial.tree import leaves

__all__ = ["POLICY_PRESETS", "Policy", "live_forward_bytes", "resolve_policy", "selective_context_fn"]

#: A policy as users write it: a preset name, op names / ops, or a policy function.
Policy = str | Sequence[Any] | Callable[..., Any]

#: The named presets and the ops they save (fused attention ops are added where this torch build has them).
POLICY_PRESETS: dict[str, tuple[str, ...]] = {"matmul": ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")}


def _overloads(op: Any) -> list[Any]:
    """Every overload of a packet (``aten.mm`` -> ``aten.mm.default``, ...); an overload as itself."""
    if hasattr(op, "overloads"):
        return [getattr(op, overload) for overload in op.overloads()]
    return [op]


def _ops(name: Any) -> list[Any]:
    return _overloads(_op(name))


def _op(name: Any) -> Any:
    if not isinstance(name, str):
        if is_op(name):
            return name
        raise ConfigurationError(f"a policy op must be an op name like 'aten.mm' or a torch.ops op, got {name!r}.")
    parts = name.removeprefix("aten.").removeprefix("aten::").split(".")
    packet = getattr(torch.ops.aten, parts[0], None) if parts[0] else None
    if packet is None or len(parts) > 2:
        raise ConfigurationError(
            f"unknown op {name!r} in a checkpoint policy; expected an aten op name such as 'aten.mm', 'aten.addmm' "
            "or 'aten.mm.default'."
        )
    if len(parts) == 2:
        overload = getattr(packet, parts[1], None)
        if overload is None:
            raise ConfigurationError(f"op {parts[0]!r} has no overload {parts[1]!r} (policy entry {name!r}).")
        return overload
    return packet


def resolve_policy(policy: Policy) -> list[Any] | Callable[..., Any]:
    """The ops to save (every overload, for ``create_selective_checkpoint_contexts``), or the policy function.

    Example:
        >>> sorted(str(op) for op in resolve_policy(["mm", "aten.addmm.default"]))[:3]
        ['aten.addmm.default', 'aten.mm.default', 'aten.mm.dtype']
    """
    if isinstance(policy, str):
        if policy not in POLICY_PRESETS:
            raise ConfigurationError(
                f"unknown checkpoint policy {policy!r}; presets are {sorted(POLICY_PRESETS)}, or pass a list of op "
                "names (e.g. ['aten.mm', 'aten.addmm']) or a policy function."
            )
        return [op for name in (*POLICY_PRESETS[policy], *sdpa_ops()) for op in _ops(name)]
    if callable(policy) and not is_op(policy):
        return policy
    if isinstance(policy, Sequence) and policy:
        return [op for name in policy for op in _ops(name)]
    raise ConfigurationError(
        f"a checkpoint policy must be a preset name ({sorted(POLICY_PRESETS)}), a non-empty list of op names, or a "
        f"function (ctx, op, *args, **kwargs) -> CheckpointPolicy; got {policy!r}."
    )


def selective_context_fn(policy: Policy) -> Callable[[], tuple[Any, Any]]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` applying ``policy``."""
    return functools.partial(create_selective_checkpoint_contexts, resolve_policy(policy))


def live_forward_bytes(fn: Callable[[], Any], exclude: Sequence[Any] = ()) -> int:
    """Bytes of the distinct storages that ops in ``fn`` created and that are still alive once it returned.

    What a forward keeps for backward, *including* the outputs selective checkpointing caches (they are held by the
    checkpoint, not saved through autograd's saved-tensor hooks, so
    :func:`~lit_partial.functional.saved_activation_bytes` does not see them). The returned value is alive while
    counting, so it counts too (a scalar loss: 4 bytes).

    Args:
        fn: The forward computation, e.g. ``lambda: model(x).sum()``.
        exclude: Tensors (or modules: their parameters and buffers) whose storages do not count.
    """
    skip: set[int] = set()
    for item in exclude:
        tensors = [*item.parameters(), *item.buffers()] if isinstance(item, torch.nn.Module) else [item]
        skip.update(t.untyped_storage().data_ptr() for t in tensors)
    records: list[tuple[weakref.ref[torch.Tensor], int, int]] = []

    class _Record(torch_dispatch_mode()):  # type: ignore[misc]  # a class from _compat
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in leaves(out):
                storage = t.untyped_storage()
                records.append((weakref.ref(t), storage.data_ptr(), storage.nbytes()))
            return out

    with _Record():
        out = fn()
    alive = {ptr: size for ref, ptr, size in records if ref() is not None and ptr not in skip}
    del out
    return sum(alive.values())
