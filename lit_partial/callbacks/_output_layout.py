"""What a skipped module returns: its hidden-state input, in the structure its real output has.

A residual block returns a tensor like its input, so skipping it returns the input. A Hugging Face layer is
called with many arguments (attention mask, position ids, cache, flags) and, depending on the library version,
returns a tensor, a tuple ``(hidden_states, attn_weights, present)`` or a ``ModelOutput``. Skipping it must
return what the model's next line expects, without running any part of the module.

* :func:`hidden_input` finds the input a skipped call returns: the first positional argument, or the keyword
  argument ``hidden_states`` when there is no positional one.
* :func:`learn_layout` reads an :class:`OutputLayout` off a real output: either "the input's own structure"
  (output and input have the same structure and shapes), or the output's structure with the hidden-state
  tensor (the first tensor of the input's shape, in traversal order) marked, every object that was passed in
  (a cache) marked by where it was passed, and every other tensor (attention weights, ...) set to ``None``.
  The layout holds no tensor of the output (only empty meta-device markers): no memory, no graph.
* :func:`skipped_output` builds the output of a skipped call from a layout and this call's arguments: the
  input in the hidden-state place, the cache passed in this call untouched, ``None`` elsewhere.
* :func:`mix_rows` puts a per-sample skip (some rows take the input) into the hidden-state place of a real output.
* :func:`call_key` identifies "the same kind of call": the module's class, the types of the arguments and
  the values of flag arguments (``use_cache=True``, ``None``). Modules of one class called the same way have
  one output structure, so a layer skipped at its first call can use what an identical layer returned.
* :func:`returns_tensor` is the cheap convention for a module that has not run yet: a ``forward`` annotated
  ``-> Tensor`` (every transformers >= 5 layer, torchvision blocks).

Every structure is walked by :mod:`lit_partial.tree` (tuples, named tuples, dicts, dataclasses and
``ModelOutput``, caches).

Example:
    >>> import torch
    >>> x = torch.ones(2, 3)
    >>> layout = learn_layout("layer", x, (x,), {"attn": None}, (x * 2, torch.zeros(2, 4, 4)))
    >>> out = skipped_output(layout, x, (x,), {})
    >>> type(out).__name__, out[0] is x, out[1]
    ('tuple', True, None)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_partial.errors import IncompatibleModuleError
from lit_partial.functional.gradients import skip_rows
from lit_partial.tree import map_tensors

__all__ = [
    "SAME_AS_INPUT",
    "OutputLayout",
    "call_key",
    "describe",
    "hidden_input",
    "learn_layout",
    "mix_rows",
    "returns_tensor",
    "skipped_output",
]

_HIDDEN = ("hidden", None)
_NOT_OBJECTS = (type(None), bool, int, float, str)  # values that are never "an object passed in and returned"


@dataclass(frozen=True, eq=False)
class OutputLayout:
    """The structure of a module's output, as a skipped call rebuilds it.

    Attributes:
        skeleton: ``None`` when the output has the input's structure and shapes (the input itself is returned);
            otherwise the output with every tensor replaced by a marker (an empty meta tensor) or ``None``.
        slots: ``id(marker) -> (kind, where)``: ``("hidden", None)``, ``("arg", index)`` or ``("kwarg", name)``.
        hidden_index: Position of the hidden-state tensor among the output's tensors (traversal order).
        source: ``"learned"`` (from a call that ran), ``"annotation"`` (``forward -> Tensor``) or ``"residual"``
            (a one-argument call assumed to return a structure like its input); the last two are checked when
            the module first runs.
        markers: Keeps the markers alive, so their ids stay unique.
    """

    skeleton: Any = None
    slots: Mapping[int, tuple[str, Any]] = field(default_factory=dict)
    hidden_index: int = 0
    source: str = "learned"
    markers: tuple[Tensor, ...] = ()

    @property
    def same_as_input(self) -> bool:
        """Whether a skipped call returns its input as it is."""
        return self.skeleton is None


SAME_AS_INPUT = OutputLayout()


def hidden_input(who: str, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The input a skipped call returns: ``args[0]``, else ``kwargs["hidden_states"]``.

    Raises:
        IncompatibleModuleError: If the module was called with keyword arguments only and none is
            ``hidden_states``, naming the module and the arguments.
    """
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise IncompatibleModuleError(
        f"{who} cannot skip module {name!r}: it is called with keyword arguments only ({sorted(kwargs)}) and none "
        "is named 'hidden_states', so there is no input to return in place of its output. Fix: select modules "
        "called with their input first (`block(x, ...)`) or as `hidden_states=`."
    )


def _kind(value: Any) -> Any:
    return value if value is None or value is True or value is False else type(value)


def call_key(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two calls "the same kind": the module's class, argument types and flag values.

    Example:
        >>> layer, x = torch.nn.Identity(), torch.ones(1)
        >>> call_key(layer, (x,), {"use_cache": False}) == call_key(layer, (torch.zeros(2),), {"use_cache": False})
        True
        >>> call_key(layer, (x,), {"use_cache": True}) == call_key(layer, (x,), {"use_cache": False})
        False
    """
    # Runs on every call of a selected module: plain tuples of types, no per-call closures.
    flags = tuple(zip(kwargs, map(_kind, kwargs.values()), strict=True)) if kwargs else ()
    return type(module), tuple(map(_kind, args)), flags


@functools.cache
def _class_returns_tensor(cls: type[nn.Module]) -> bool:
    try:
        annotation = inspect.signature(cls.forward).return_annotation
    except (TypeError, ValueError):  # builtins or odd callables: no signature to read
        return False
    if isinstance(annotation, str):  # `from __future__ import annotations`
        return annotation.rpartition(".")[2] in {"Tensor", "FloatTensor"}
    return isinstance(annotation, type) and issubclass(annotation, Tensor)


def returns_tensor(module: nn.Module) -> bool:
    """Whether ``type(module).forward`` is annotated to return a tensor (read once per class; nothing runs).

    Example:
        >>> returns_tensor(torch.nn.Linear(1, 1)), returns_tensor(torch.nn.LSTM(1, 1))
        (True, False)
    """
    return _class_returns_tensor(type(module))  # type: ignore[arg-type]  # classes hash; Module's stub says not


def _passed_objects(x: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[int, tuple[str, Any]]:
    """Objects passed into the call other than the hidden-state input: ``id -> ("arg", i) | ("kwarg", name)``."""
    found: dict[int, tuple[str, Any]] = {}
    for i, value in enumerate(args):
        if value is not x and not isinstance(value, _NOT_OBJECTS):
            found.setdefault(id(value), ("arg", i))
    for key, value in kwargs.items():
        if value is not x and not isinstance(value, _NOT_OBJECTS):
            found.setdefault(id(value), ("kwarg", key))
    return found


def describe(value: Any) -> str:
    """A short description of a structure: tensors as their shapes (for error messages).

    Example:
        >>> describe((torch.ones(2, 3), None))
        '((2, 3), None)'
    """
    try:
        text = repr(map_tensors(value, lambda t: tuple(t.shape)))
    except Exception:  # only for a message: anything unreadable is named by its type
        text = type(value).__qualname__
    return text if len(text) <= 300 else text[:297] + "..."


def _mismatch(who: str, name: str, x: Any, out: Any) -> IncompatibleModuleError:
    shape = describe(x)
    if isinstance(out, Tensor) or not isinstance(x, Tensor):
        problem = f"its output {describe(out)} differs from its input {shape}"
    else:
        problem = f"its output {type(out).__qualname__} {describe(out)} holds no tensor of its input's shape {shape}"
    return IncompatibleModuleError(
        f"{who} cannot skip module {name!r}: {problem}, so returning the input would break the next layer. Fix: "
        "select residual-style modules whose output has the shape of their input (e.g. 'blocks.*', not a "
        "downsampling stage)."
    )


def learn_layout(
    name: str, x: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any], out: Any, *, who: str = "ConditionalSkip"
) -> OutputLayout:
    """Read the layout of ``out``, the output of a call of module ``name`` with hidden-state input ``x``.

    Raises:
        IncompatibleModuleError: If ``out`` has neither the structure and shapes of ``x`` nor (for a tensor
            ``x``) a tensor of ``x``'s shape; the message names the module and what it returned.
    """
    if isinstance(out, Tensor) and isinstance(x, Tensor):  # the common case, kept cheap: blocks, transformers >= 5
        if out.shape == x.shape:
            return SAME_AS_INPUT
        raise _mismatch(who, name, x, out)
    if not isinstance(x, Tensor):
        if map_tensors(out, lambda t: tuple(t.shape)) == map_tensors(x, lambda t: tuple(t.shape)):
            return SAME_AS_INPUT
        raise _mismatch(who, name, x, out)
    markers: list[Tensor] = []
    slots: dict[int, tuple[str, Any]] = {}

    def mark(slot: tuple[str, Any]) -> Tensor:
        marker = torch.empty(0, device="meta")
        markers.append(marker)
        slots[id(marker)] = slot
        return marker

    passed = {key: mark(slot) for key, slot in _passed_objects(x, args, kwargs).items()}
    count, hidden = 0, -1

    def to_marker(t: Tensor) -> Tensor | None:
        nonlocal count, hidden
        index, count = count, count + 1
        if hidden < 0 and (t is x or t.shape == x.shape):
            hidden = index
            return mark(_HIDDEN)
        return None  # attention weights and other by-products: a skipped layer produces none

    skeleton = map_tensors(out, to_marker, substitute=passed, what=f"the output of {name!r}")
    if hidden < 0:
        raise _mismatch(who, name, x, out)
    return OutputLayout(skeleton, slots, hidden, "learned", tuple(markers))


def skipped_output(layout: OutputLayout, x: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The output of a skipped call: ``x`` in the hidden-state place of ``layout``, passed objects as passed now."""
    if layout.skeleton is None:
        return x

    def fill(marker: Tensor) -> Any:
        kind, where = layout.slots[id(marker)]
        if kind == "hidden":
            return x
        if kind == "arg":
            return args[where] if where < len(args) else None
        return kwargs.get(where)

    return map_tensors(layout.skeleton, fill)


def mix_rows(
    layout: OutputLayout, x: Any, out: Any, mask: Tensor, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    """``out`` with the rows of its hidden-state tensor where ``mask`` holds replaced by ``x``'s (per-sample skip)."""
    if layout.skeleton is None:
        return skip_rows(x, out, mask)
    keep = _objects_by_id(x, args, kwargs)
    count = 0

    def take(t: Tensor) -> Tensor:
        nonlocal count
        index, count = count, count + 1
        return skip_rows(x, t, mask) if index == layout.hidden_index else t

    return map_tensors(out, take, substitute=keep)


def _objects_by_id(x: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[int, Any]:
    values = {id(v): v for v in (*args, *kwargs.values())}
    return {key: values[key] for key in _passed_objects(x, args, kwargs)}
