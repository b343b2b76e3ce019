"""Count the activation memory a backward pass holds: bytes of distinct storages saved for backward.

Autograd keeps, for every op that needs them in backward, references to tensors ("saved tensors").
:class:`SavedTensorTracker` sees each of them through ``torch.autograd.graph.saved_tensors_hooks`` and
wraps it in a tiny holder object that lives exactly as long as the graph node keeping it. So
:meth:`SavedTensorTracker.live_bytes` counts what the graph *still* holds: a subgraph cut off by a
``.detach()`` is freed together with its saved tensors and no longer counts. Storages are counted once
however many ops (or views) save them; parameters (and anything passed in ``exclude``) never count.

Tensors saved inside ``torch.utils.checkpoint`` regions or ``save_on_cpu`` are intercepted by those
tools' own (inner) hooks, so they do not count here: what counts is what stays on the device. Python
numbers that autograd wraps into tensors (``loss / 2``) bypass saved-tensor hooks and never count (8 bytes each).
A saved view counts its whole storage, since it keeps all of it alive (e.g. a chunk of the input batch).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(16, 4)
    >>> # Linear 0 keeps its input x (16*4 floats); ReLU its output, which Linear 2 keeps too (16*8 floats)
    >>> saved_activation_bytes(lambda: model(x).sum())
    768
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks

from lit_partial._compat import version_counter, view_base

__all__ = ["SavedTensorTracker", "saved_activation_bytes", "storage_key"]


class _Saved:
    """What autograd stores instead of the tensor: its lifetime is the graph node's lifetime."""

    __slots__ = ("__weakref__", "tensor", "version")

    def __init__(self, tensor: Tensor) -> None:
        # detach(): a saved *output* kept with its grad_fn would form a cycle node -> holder -> tensor -> node
        # that never frees; the detached alias shares storage and version counter, and autograd re-attaches
        # the history on unpack.
        self.tensor = tensor.detach()
        self.version = version_counter(tensor)


def _unpack(obj: Any) -> Any:
    if not isinstance(obj, _Saved):
        return obj
    if version_counter(obj.tensor) != obj.version:  # what autograd checks itself when no hooks are installed
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"{type(obj.tensor).__name__} of shape {list(obj.tensor.shape)} is at version "
            f"{version_counter(obj.tensor)}; "
            f"expected version {obj.version} instead (seen while counting saved activations)."
        )
    return obj.tensor


def storage_key(t: Tensor) -> tuple[Any, int]:
    """``(key, nbytes)`` of the storage behind ``t``: equal keys mean the same memory (views share it)."""
    try:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr:  # null pointers (empty or meta storages) are not unique: fall back to the object
            return (str(t.device), ptr), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested or wrapper subclasses
        pass
    return ("object", id(t)), t.numel() * t.element_size()


def _is_parameter(t: Tensor) -> bool:
    # Linear saves `weight.t()`, a view: its `_base` is the Parameter itself.
    return isinstance(t, nn.Parameter) or isinstance(view_base(t), nn.Parameter)


_THREAD = threading.local()  # saved_tensors_hooks are per thread, so is the list of active trackers


def _active_trackers() -> list[SavedTensorTracker]:
    active: list[SavedTensorTracker] | None = getattr(_THREAD, "trackers", None)
    if active is None:
        active = _THREAD.trackers = []
    return active


class SavedTensorTracker:
    """Context manager recording every tensor autograd saves while it is active; counts the live ones.

    Trackers nest: a tensor saved while several are active counts in each of them (a callback measuring
    inside another's measurement sees the same bytes). Other ``saved_tensors_hooks`` entered after a tracker
    (``torch.utils.checkpoint``, ``save_on_cpu``) handle their tensors themselves, so those do not count.
    The tracker changes nothing about the computation: backward unpacks the very same tensors. Costs one
    small object per saved tensor while active, nothing when not used.

    Args:
        exclude: Tensors and modules (all their parameters and buffers) whose storages never count;
            ``nn.Parameter`` s and views of them never count anyway.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(3, 3)
        >>> with SavedTensorTracker() as tracker:
        ...     out = layer(torch.randn(2, 3)).relu().sum()
        >>> tracker.live_bytes()  # input of the Linear (6 floats) and output of the ReLU (6 floats)
        48
        >>> del out
        >>> tracker.live_bytes()
        0
    """

    def __init__(self, exclude: Iterable[Tensor | nn.Module] = ()) -> None:
        self._excluded: set[Any] = set()
        for item in [exclude] if isinstance(exclude, Tensor | nn.Module) else exclude:
            tensors = [*item.parameters(), *item.buffers()] if isinstance(item, nn.Module) else [item]
            self._excluded.update(storage_key(t)[0] for t in tensors)
        self._holders: weakref.WeakSet[_Saved] = weakref.WeakSet()
        self._hooks: saved_tensors_hooks | None = None

    def _counts(self, t: Tensor) -> bool:
        return not (self._excluded and storage_key(t)[0] in self._excluded)

    def _pack(self, t: Tensor) -> Any:
        # Only the innermost hooks run: this tracker packs for every tracker entered before it, too.
        if _is_parameter(t):
            return t
        trackers = [tracker for tracker in _active_trackers() if tracker._counts(t)]
        if not trackers:
            return t
        holder = _Saved(t)
        for tracker in trackers:
            tracker._holders.add(holder)
        return holder

    def __enter__(self) -> SavedTensorTracker:
        if self._hooks is not None:
            raise RuntimeError("this SavedTensorTracker is already active; create another one to nest.")
        self._hooks = saved_tensors_hooks(self._pack, _unpack)
        self._hooks.__enter__()
        _active_trackers().append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            active = _active_trackers()
            active[:] = [tracker for tracker in active if tracker is not self]  # callbacks may close out of order
            hooks.__exit__(*exc)

    @property
    def active(self) -> bool:
        """Whether the tracker is between ``__enter__`` and ``__exit__``."""
        return self._hooks is not None

    def live_bytes(self) -> int:
        """Bytes of the distinct storages that tensors saved while tracking, still held by a graph, occupy."""
        sizes = dict(storage_key(holder.tensor) for holder in list(self._holders))
        return sum(sizes.values())

    def live_count(self) -> int:
        """Number of saved-tensor references still held (a storage saved by two ops counts twice)."""
        return len(self._holders)

    def clear(self) -> None:
        """Forget what was recorded so far (tensors already saved stay usable by backward)."""
        self._holders = weakref.WeakSet()


def saved_activation_bytes(fn: Callable[[], Any], exclude: Iterable[Tensor | nn.Module] = ()) -> int:
    """Run ``fn`` (a forward pass) and return the bytes its graph keeps for backward, once ``fn`` returned.

    ``fn`` must return what the backward would start from (usually the loss) and must not call
    ``backward`` itself: the count is taken while the returned value is alive, then the value is dropped.
    Storages shared by several saved tensors count once; parameters never count.

    Args:
        fn: The forward computation, e.g. ``lambda: loss_fn(model(x), y)``.
        exclude: Tensors or modules (parameters and buffers) whose storages do not count, e.g. the model,
            so that BatchNorm running statistics saved by ``batch_norm`` are left out.

    Example:
        >>> import torch
        >>> x = torch.randn(8, 4, requires_grad=True)
        >>> saved_activation_bytes(lambda: x.exp().sum())  # exp keeps its output: 32 floats
        128
    """
    with SavedTensorTracker(exclude) as tracker:
        out = fn()
    nbytes = tracker.live_bytes()
    del out
    return nbytes
