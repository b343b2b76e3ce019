"""One tree utility for batches, module outputs and recurrent state.

Everything in lit_partial that looks inside a structure of tensors (slicing a batch, detaching a module's
output or an RNN's hidden state, scaling gradients, finding the activation a statistic looks at) goes
through :func:`map_tensors`, built on Lightning's public ``apply_to_collection``. The rules are one set:

* tensors are the leaves that functions apply to;
* tuples, named tuples, lists (any ``Sequence`` but ``str``), dicts (any ``Mapping``: ``OrderedDict``,
  ``defaultdict``, Hugging Face ``BatchEncoding``) and dataclasses (Hugging Face ``ModelOutput`` too) are
  traversed and rebuilt with their own type;
* objects that keep their tensors as attributes (Hugging Face ``Cache`` objects, and any class passed to
  :func:`register_tensor_holder`) are traversed through their attributes and rebuilt as a shallow copy;
  the original object is never modified;
* plain values (``None``, numbers, strings, dtypes, devices, enums) pass through, or are an error where
  the caller needs every leaf to be a tensor (``plain="error"``, e.g. slicing a batch per sample);
* anything else is an :class:`~lit_partial.errors.UnsupportedStructureError` naming its type: never a
  silent pass-through, which would leave a tensor inside it attached to a graph or unsliced.

Example:
    >>> import torch
    >>> from collections import namedtuple
    >>> State = namedtuple("State", "h c")
    >>> x = torch.ones(2, requires_grad=True)
    >>> out = map_tensors({"state": State(x * 2, x * 3), "step": 4}, torch.Tensor.detach)
    >>> type(out["state"]).__name__, out["state"].h.requires_grad, out["step"]
    ('State', False, 4)
    >>> len(leaves((x, [x, {"y": x}])))
    3
"""

from __future__ import annotations

import copy
import enum
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from lightning_utilities.core.apply_func import apply_to_collection, is_dataclass_instance
from torch import Tensor

from lit_partial.errors import UnsupportedStructureError

__all__ = [
    "UnsupportedStructureError",
    "detach",
    "first_tensor",
    "leaves",
    "map_tensors",
    "rebuild",
    "register_tensor_holder",
]

Plain = Literal["keep", "error"]

_PLAIN_TYPES: tuple[type, ...] = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    torch.dtype,
    torch.device,
    enum.Enum,
    slice,
    type(Ellipsis),
)
_FORMS = "tensors, tuples, named tuples, lists, dicts and other mappings, dataclasses, and Hugging Face caches"

_holders: list[type] = []


def register_tensor_holder(cls: type) -> type:
    """Let :func:`map_tensors` look inside instances of ``cls`` through their attributes (``vars(obj)``).

    For objects that keep tensors (or containers of them) as plain attributes, such as a custom recurrent
    state or cache. Instances are rebuilt as a shallow copy with mapped attributes; the original object
    is left untouched. Usable as a class decorator.

    Example:
        >>> @register_tensor_holder
        ... class Memory:
        ...     def __init__(self, h):
        ...         self.h = h
        >>> m = Memory(torch.ones(1, requires_grad=True) * 2)
        >>> detach(m).h.requires_grad, m.h.requires_grad
        (False, True)
    """
    if not isinstance(cls, type):
        raise UnsupportedStructureError(f"register_tensor_holder takes a class, got {cls!r}.")
    if cls not in _holders:
        _holders.append(cls)
    return cls


def _hf_cache_types() -> tuple[type, ...]:
    # Only when transformers is already imported: importing it here would cost seconds for everyone else.
    module = sys.modules.get("transformers.cache_utils")
    if module is None:
        return ()
    return tuple(t for name in ("Cache", "CacheLayerMixin") if isinstance(t := getattr(module, name, None), type))


def _is_holder(obj: Any) -> bool:
    return isinstance(obj, (*_holders, *_hf_cache_types())) and hasattr(obj, "__dict__")


class _LeafMeta(type):
    """``isinstance(x, _Leaf)`` holds for everything ``apply_to_collection`` would not descend into."""

    def __instancecheck__(cls, obj: Any) -> bool:
        if isinstance(obj, str | bytes):
            return True
        return not isinstance(obj, Mapping | Sequence) and not is_dataclass_instance(obj)


class _Leaf(metaclass=_LeafMeta):
    pass


def _describe(obj: Any) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _locate(value: Any, target: Any, where: str) -> str | None:
    """Where ``target`` sits inside ``value`` (``"batch['x'][0]"``), for error messages only."""
    if value is target:
        return where
    if isinstance(value, Mapping):
        items: Any = ((f"[{k!r}]", v) for k, v in value.items())
    elif is_dataclass_instance(value) or _is_holder(value):
        items = ((f".{k}", v) for k, v in vars(value).items())
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for key, v in items if (found := _locate(v, target, where + key)) is not None), None)


def map_tensors(
    value: Any,
    fn: Callable[[Tensor], Any],
    *,
    plain: Plain = "keep",
    what: str = "value",
    error: type[UnsupportedStructureError] = UnsupportedStructureError,
    substitute: Mapping[int, Any] | None = None,
) -> Any:
    """``value`` with every tensor replaced by ``fn(tensor)``; containers keep their types (see the module doc).

    Args:
        value: A tensor or any supported structure of tensors.
        fn: Applied to every tensor leaf, in traversal order (mapping order, sequence order, field order).
        plain: ``"keep"`` passes plain values (None, numbers, strings, ...) through; ``"error"`` refuses them
            (for operations that must reach every leaf, such as slicing a batch per sample).
        what: Names ``value`` in error messages, as the root of the path to a bad leaf (e.g. ``"batch"``).
        error: The error class to raise (a subclass of :class:`UnsupportedStructureError`).
        substitute: ``{id(obj): replacement}``: leaves (tensors, caches and other tensor holders, plain values)
            that are one of these objects are replaced whole, neither traversed nor passed to ``fn``; e.g. a
            cache object passed into a layer and returned by it stays that very object. Containers (tuples,
            lists, dicts, dataclasses) are always traversed.

    Raises:
        UnsupportedStructureError: For a leaf that is neither a tensor, a supported container, a registered
            tensor holder nor (with ``plain="keep"``) a plain value, naming its type and the fix.

    Example:
        >>> x, kept = torch.ones(1), torch.ones(1)
        >>> out = map_tensors([x, {"kept": kept}], lambda t: t * 2, substitute={id(kept): kept})
        >>> out[0].item(), out[1]["kept"] is kept
        (2.0, True)
    """

    def leaf(x: Any) -> Any:
        if substitute and id(x) in substitute:
            return substitute[id(x)]
        if isinstance(x, Tensor):
            return fn(x)
        if _is_holder(x):
            clone = copy.copy(x)
            for name, attr in vars(x).items():
                object.__setattr__(clone, name, map_tensors(attr, fn, plain="keep", what=what, substitute=substitute))
            return clone
        if isinstance(x, _PLAIN_TYPES) and plain == "keep":
            return x
        at = f"type {_describe(x)} at {_locate(value, x, what) or what}"  # only on the way to an error
        if isinstance(x, _PLAIN_TYPES):
            raise error(
                f"{what} holds an element of {at} ({x!r:.40}) where a tensor is needed: every leaf must be a tensor "
                f"with the batch dimension first. Fix: convert it to a tensor in the dataset or collate_fn, or move it "
                "out of the batch."
            )
        raise error(
            f"{what} holds an element of {at}, which lit_partial cannot look inside (it handles {_FORMS}); a tensor "
            "in it would be missed. Fix: convert it to one of those, or if it keeps its tensors as attributes call "
            f"lit_partial.tree.register_tensor_holder({type(x).__qualname__})."
        )

    if torch.compiler.is_compiling():
        # Dynamo does not call _LeafMeta.__instancecheck__ (`isinstance(x, _Leaf)` is False for every x inside a
        # compiled region, so nothing would be mapped: a detach would silently do nothing). There, walk with plain
        # classes: tensors and tensor holders are the leaves, other values pass through unchanged.
        return apply_to_collection(value, (Tensor, *_holders, *_hf_cache_types()), leaf)
    try:
        return apply_to_collection(value, _Leaf, leaf)
    except ValueError as err:
        if "frozen dataclass" not in str(err):
            raise
        raise UnsupportedStructureError(
            f"{what} holds a frozen dataclass, which cannot be rebuilt with new tensors. Fix: use a regular "
            "dataclass, a named tuple or a dict."
        ) from None


def detach(value: Any) -> Any:
    """``value`` with every tensor detached from the graph (same structure, same storage, no copy).

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> detach([x * 2, (x, None)])[1][0].requires_grad
        False
    """
    return map_tensors(value, Tensor.detach)


def leaves(
    value: Any,
    *,
    plain: Plain = "keep",
    what: str = "value",
    error: type[UnsupportedStructureError] = UnsupportedStructureError,
) -> list[Tensor]:
    """Every tensor in ``value``, in traversal order.

    Example:
        >>> [t.item() for t in leaves({"a": torch.tensor(1), "b": [torch.tensor(2), "text"]})]
        [1, 2]
    """
    found: list[Tensor] = []

    def collect(t: Tensor) -> Tensor:
        found.append(t)
        return t

    map_tensors(value, collect, plain=plain, what=what, error=error)
    return found


def rebuild(value: Any, tensors: Sequence[Tensor], *, what: str = "value") -> Any:
    """``value`` with its tensors replaced, in traversal order, by ``tensors`` (as many as :func:`leaves` gives).

    Raises:
        UnsupportedStructureError: If the number of tensors differs from the number of leaves.

    Example:
        >>> rebuild((torch.zeros(1), {"b": torch.zeros(1)}), [torch.ones(1), torch.ones(2)])[1]["b"]
        tensor([1., 1.])
    """
    items = iter(tensors)
    count = 0

    def take(_: Tensor) -> Tensor:
        nonlocal count
        count += 1
        try:
            return next(items)
        except StopIteration:
            raise UnsupportedStructureError(f"{what}: {len(tensors)} tensors given, but it holds more.") from None

    out = map_tensors(value, take, what=what)
    if count != len(tensors):
        raise UnsupportedStructureError(f"{what}: {len(tensors)} tensors given for {count} leaves.")
    return out


def first_tensor(value: Any, *, floating: bool = True) -> Tensor | None:
    """The first tensor of ``value`` in traversal order (the first floating-point one by default), or None.

    Example:
        >>> first_tensor((torch.tensor([1]), {"h": torch.tensor([0.5])}))
        tensor([0.5000])
    """
    if isinstance(value, Tensor):
        return value if (value.is_floating_point() or not floating) else None
    return next((t for t in leaves(value) if t.is_floating_point() or not floating), None)
