"""One way to attach things to a model and take them off again: every attachment is a handle.

The lowest layer of the package (it imports torch and :mod:`lit_partial.errors` only); ``lit_partial.attach`` is
its former name and re-exports it.

Callbacks change how a model runs without editing its code: forward hooks (torch's own, which already
return handles), forward wrappers (run code around a module's ``forward``: skipping, checkpointing,
offloading), gates (named points in a mixin model's ``forward``) and batch transforms (replacing the
batch of a mixin model). This module gives the last three the same contract as torch's hooks, in the
spirit of ``torch.nn.utils.prune``'s apply/remove symmetry:

* every ``add_*`` / ``wrap_forward`` returns a :class:`Handle` whose ``remove()`` undoes exactly that
  attachment (calling it twice is harmless);
* any number of attachments compose on the same module, in any order, and can be removed in any order;
* once every attachment of a module is removed, the module is exactly as it was: the same ``forward``
  (its own instance attribute, if it had one, or none), no hook, no extra ``__dict__`` entry.

:class:`Handles` collects the handles of one owner (a callback) and removes them last-first.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> before = dict(layer.__dict__)
    >>> outer = wrap_forward(layer, lambda forward, x: forward(x) * 0, outer=True)
    >>> inner = wrap_forward(layer, lambda forward, x: forward(x) + 1)
    >>> bool((layer(torch.ones(1, 2)) == 0).all())
    True
    >>> outer.remove(); inner.remove()
    >>> layer.__dict__ == before
    True
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from torch import nn

from lit_partial.errors import UsageError

__all__ = [
    "APPLIES_BATCH_TRANSFORMS",
    "BatchTransform",
    "ForwardWrapper",
    "GateFn",
    "Handle",
    "Handles",
    "Removable",
    "batch_transforms",
    "gate_functions",
    "record_gate",
    "register_batch_transform",
    "register_gate",
    "watch_gates",
    "wrap_forward",
]

ForwardWrapper = Callable[..., Any]
"""``wrapper(forward, *args, **kwargs) -> output``: calls ``forward(*args, **kwargs)`` zero or more times."""
GateFn = Callable[[Any], Any]
BatchTransform = Callable[[Any, int], Any]
#: The class attribute by which a model class says it runs :func:`batch_transforms` (``PartialBackpropMixin``).
APPLIES_BATCH_TRANSFORMS = "__lit_partial_batch_transforms__"

GATES_ATTR = "_lit_partial_gates"
TRANSFORMS_ATTR = "_lit_partial_batch_transforms"
_CHAIN_ATTR = "__lit_partial_chain__"


class Removable(Protocol):
    """Anything with an idempotent ``remove()``: our handles, torch's ``RemovableHandle``."""

    def remove(self) -> None:
        """Undo the attachment."""


class Handle:
    """Undoes one attachment; ``remove()`` may be called any number of times, and it works as a context manager.

    Example:
        >>> undone = []
        >>> with Handle(lambda: undone.append(1)):
        ...     pass
        >>> undone
        [1]
    """

    __slots__ = ("_undo",)

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Callable[[], None] | None = undo

    def remove(self) -> None:
        """Undo the attachment (a no-op after the first call)."""
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class Handles:
    """The handles of one owner, removed in reverse order of attachment (a stack).

    Example:
        >>> order = []
        >>> handles = Handles()
        >>> _ = handles.add(Handle(lambda: order.append("first")))
        >>> _ = handles.add(Handle(lambda: order.append("second")))
        >>> handles.remove(); order
        ['second', 'first']
    """

    def __init__(self, handles: Iterable[Removable] = ()) -> None:
        self._handles: list[Removable] = list(handles)

    def add(self, handle: Removable) -> Removable:
        """Keep ``handle`` (returned, for chaining) until :meth:`remove`."""
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove everything, last attached first; calling it twice is harmless."""
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)


# --- forward wrappers ---------------------------------------------------------------------------------------


def wrap_forward(module: nn.Module, wrapper: ForwardWrapper, *, outer: bool = False) -> Handle:
    """Run ``wrapper(forward, *args, **kwargs)`` instead of ``module.forward(*args, **kwargs)`` until removed.

    Several wrappers on one module form a chain around the module's own ``forward``: each receives the next
    inner one as ``forward``. Wrappers with ``outer=True`` (e.g. skipping: a skipped module must run
    nothing, not even a checkpoint) sit outside every ordinary wrapper; within each kind, later wrappers sit
    further out. The chain lives in one function installed as the module's ``forward`` instance attribute
    while at least one wrapper is attached; removing the last restores the module's previous ``forward``.

    Args:
        module: The module whose ``forward`` is wrapped (``module(x)`` and ``module.forward(x)`` both see it).
        wrapper: ``(forward, *args, **kwargs) -> output``.
        outer: Place the wrapper outside every wrapper registered without ``outer``.

    Returns:
        A :class:`Handle` removing this wrapper.
    """
    current = module.__dict__.get("forward")
    chain: list[tuple[bool, int, ForwardWrapper]] | None = getattr(current, _CHAIN_ATTR, None)
    if current is None or chain is None:
        chain = []
        current = _install_dispatcher(module, chain)
    dispatcher: Callable[..., Any] = current
    key = object()
    chain.append((outer, id(key), wrapper))
    chain.sort(key=lambda item: item[0])  # stable: inner wrappers first, each kind in registration order

    def undo() -> None:
        chain[:] = [item for item in chain if item[1] != id(key)]
        if not chain:
            _uninstall_dispatcher(module, dispatcher)
        del keep_alive[:]

    keep_alive = [key]  # the key's id stays unique while the wrapper is attached
    return Handle(undo)


def _install_dispatcher(module: nn.Module, chain: list[tuple[bool, int, ForwardWrapper]]) -> Callable[..., Any]:
    had_own = "forward" in module.__dict__
    own = module.__dict__.get("forward")

    def base(*args: Any, **kwargs: Any) -> Any:
        # Resolved per call, so a forward patched on the class later is still honoured.
        if had_own and own is not None:
            return own(*args, **kwargs)
        return type(module).forward(module, *args, **kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        call: Callable[..., Any] = base
        for _, _, wrapper in chain:
            call = functools.partial(wrapper, call)
        return call(*args, **kwargs)

    setattr(forward, _CHAIN_ATTR, chain)
    forward.__lit_partial_restore__ = (had_own, own)  # type: ignore[attr-defined]  # a marker on a function
    module.__dict__["forward"] = forward
    return forward


def _uninstall_dispatcher(module: nn.Module, dispatcher: Callable[..., Any]) -> None:
    if module.__dict__.get("forward") is not dispatcher:  # someone replaced it since: leave theirs alone
        return
    had_own, own = getattr(dispatcher, "__lit_partial_restore__")  # noqa: B009 - set by _install_dispatcher
    if had_own:
        module.__dict__["forward"] = own
    else:
        del module.__dict__["forward"]


# --- gates and batch transforms (PartialBackpropMixin models) ------------------------------------------------


class _Registry:
    """Per-model attachments of one kind, kept in the model's ``__dict__`` only while non-empty."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def get(self, model: nn.Module) -> dict[Any, Any] | None:
        found = model.__dict__.get(self.attr)
        return found if isinstance(found, dict) else None

    def add(self, model: nn.Module, key: Any, item: Any) -> Handle:
        entries = model.__dict__.setdefault(self.attr, {})
        token = object()
        entries.setdefault(key, {})[id(token)] = item

        def undo() -> None:
            current = model.__dict__.get(self.attr)
            if current is None:
                return
            bucket = current.get(key, {})
            bucket.pop(id(token), None)
            if not bucket:
                current.pop(key, None)
            if not current:
                del model.__dict__[self.attr]
            del keep_alive[:]

        keep_alive = [token]
        return Handle(undo)


_gates = _Registry(GATES_ATTR)
_transforms = _Registry(TRANSFORMS_ATTR)
# The key under which gate watchers are kept in the gates registry: a string no gate can have (Dynamo cannot
# compare an object() key, so a compiled forward would break its graph at every gate).
_WATCH = "\0watchers"


def register_gate(model: nn.Module, name: str, fn: GateFn) -> Handle:
    """Make ``model.gate(name, x)`` return ``fn(x)`` until the handle is removed; several compose in order.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(1, 1)
        >>> handle = register_gate(model, "features", lambda x: x * 2)
        >>> [fn(1) for fn in gate_functions(model, "features")]
        [2]
        >>> handle.remove(); gate_functions(model, "features")
        ()
    """
    if not isinstance(name, str) or not name or name == _WATCH:
        raise UsageError(f"a gate name must be a non-empty string, got {name!r}.")
    return _gates.add(model, name, fn)


def gate_functions(model: nn.Module, name: str) -> tuple[GateFn, ...]:
    """The functions attached to gate ``name`` of ``model``, in order (empty when none)."""
    gates = _gates.get(model)
    return tuple(gates[name].values()) if gates and name in gates else ()


def watch_gates(model: nn.Module, seen: set[str]) -> Handle:
    """Record in ``seen`` the name of every gate ``model`` passes through until the handle is removed.

    Callbacks use it to check, after the first training step, that the gate names of their rules exist; they keep
    it until teardown, since removing it would change what a compiled forward reads (one more graph).
    """
    return _gates.add(model, _WATCH, seen)


def record_gate(model: nn.Module, name: str) -> None:
    """Called by ``PartialBackpropMixin.gate``: tell the watchers (if any) that gate ``name`` ran."""
    gates = _gates.get(model)
    if gates and _WATCH in gates:
        for seen in gates[_WATCH].values():
            seen.add(name)


def register_batch_transform(model: nn.Module, fn: BatchTransform) -> Handle:
    """Replace every batch of a mixin model by ``fn(batch, dataloader_idx)`` after it reaches the device.

    The function sees training, validation, test and predict batches and decides itself when to act.

    Raises:
        UsageError: If ``model`` does not inherit :class:`~lit_partial.PartialBackpropMixin`.
    """
    if not getattr(type(model), APPLIES_BATCH_TRANSFORMS, False):  # the mixin declares it (no import: layers)
        raise UsageError(
            f"{type(model).__name__} cannot have its batches replaced: a Lightning callback cannot reach the batch. "
            f"Fix: declare `class {type(model).__name__}(PartialBackpropMixin, L.LightningModule)`."
        )
    return _transforms.add(model, None, fn)


def batch_transforms(model: nn.Module) -> tuple[BatchTransform, ...]:
    """The batch transforms attached to ``model``, in order."""
    transforms = _transforms.get(model)
    return tuple(transforms[None].values()) if transforms else ()
