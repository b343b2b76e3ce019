"""Deterministic counters for claims: FLOPs of a training step, storages a forward leaves alive.

Saved-activation bytes through autograd's hooks live beside it (:class:`~lit_partial.functional.SavedTensorTracker`).

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(4, 3, bias=False)
    >>> # forward 2*2*4*3 = 48; backward computes only the weight gradient (the input needs none): 48 more
    >>> count_flops(lambda: layer(torch.randn(2, 4)).sum().backward())
    96
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lit_partial._compat import torch_dispatch_mode

__all__ = ["LiveStorageCounter", "count_flops"]


def count_flops(fn: Callable[[], Any]) -> int:
    """Run ``fn`` once and return the FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts.

    Matrix products and convolutions are counted (forward and backward); elementwise ops are not,
    which is what makes ratios such as ``1 - 2k/(3N)`` for freezing exact.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _storage(t: Tensor) -> tuple[int | None, int]:
    """``(data pointer, bytes)`` of ``t``'s storage; ``(None, 0)`` for a subclass without one (DTensor)."""
    try:
        storage = t.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None, 0


class LiveStorageCounter:
    """Context manager recording the storage of every op output while active; counts the distinct ones still alive.

    After a forward, that is what the forward keeps for backward *including* the outputs selective checkpointing
    (``policy=``) caches inside the checkpoint, which autograd's saved-tensor hooks (so ``SavedTensorTracker``) do
    not see. Recording stops at exit; :meth:`live_bytes` can be read after it. Outputs that are tensor subclasses
    without a storage of their own (DTensor, so FSDP2's parameters' products) are not counted.

    Args:
        exclude: Tensors and modules (their parameters and buffers) whose storages never count.

    Example:
        >>> layer = torch.nn.Linear(3, 3)
        >>> with LiveStorageCounter(exclude=[layer]) as counter:
        ...     out = layer(torch.randn(2, 3)).relu()
        >>> counter.live_bytes()  # the input (kept by the Linear for backward) and the ReLU's output: 6 floats each
        48
        >>> del out  # frees the graph, and the input with it
        >>> counter.live_bytes()
        0
    """

    def __init__(self, exclude: Iterable[Tensor | nn.Module] = ()) -> None:
        self._skip: set[int] = set()
        for item in [exclude] if isinstance(exclude, Tensor | nn.Module) else exclude:
            tensors = [*item.parameters(), *item.buffers()] if isinstance(item, nn.Module) else [item]
            self._skip.update(ptr for ptr, _ in map(_storage, tensors) if ptr is not None)
        self._records: list[tuple[weakref.ref[Tensor], int, int]] = []
        self._mode: Any = None

    def __enter__(self) -> LiveStorageCounter:
        records = self._records

        class _Record(torch_dispatch_mode()):  # type: ignore[misc]  # a class from _compat
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, tuple | list) else (out,):  # an op returns a tensor or a sequence
                    if not isinstance(t, torch.Tensor):  # profiler ops return ScriptObjects: not storages
                        continue
                    ptr, size = _storage(t)
                    if ptr is not None:
                        records.append((weakref.ref(t), ptr, size))
                return out

        self._mode = _Record()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)

    def live_bytes(self) -> int:
        """Bytes of the distinct recorded storages whose tensors are still alive (excluded ones left out)."""
        alive = {ptr: size for ref, ptr, size in self._records if ref() is not None and ptr not in self._skip}
        return sum(alive.values())
