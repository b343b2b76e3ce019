"""Selectors: strings that name modules and parameters of a model.

A selector is one of

* an exact name from ``named_modules()`` / ``named_parameters()``: ``"backbone.0"``, ``"head.weight"``;
* a glob: ``*`` matches within one dotted component, ``**`` across components, ``?`` one character and
  ``[0-3]`` a character class, so ``"blocks.*"`` names the blocks themselves, not their children;
* a regular expression written ``"re:<pattern>"``, matched against the whole name.

Selecting a module selects everything under it. Every function returns matches in model order,
without duplicates, and raises :class:`SelectorError` naming the closest existing names when a
selector matches nothing.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> [name for name, _ in select_modules(model, "re:[02]")]
    ['0', '2']
    >>> [name for name, _ in select_parameters(model, ["2", "0.bias"])]
    ['0.bias', '2.weight', '2.bias']
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import re
from collections.abc import Iterable, Sequence

from torch import Tensor, nn

from lit_partial.errors import SelectorError

__all__ = [
    "SelectorError",
    "Selectors",
    "as_selector_list",
    "match_names",
    "outermost",
    "select_modules",
    "select_parameters",
]

Selectors = str | Sequence[str]
"""One selector or a sequence of them."""

_FORMS = "an exact name, a glob ('blocks.*' within one level, 'encoder.**' across levels) or 're:<pattern>'"


def as_selector_list(selectors: Selectors, *, argument: str = "selectors") -> list[str]:
    """Normalize one selector or a sequence of selectors into a list of non-empty strings.

    Args:
        selectors: A selector string or a sequence of them.
        argument: The argument name used in error messages.

    Raises:
        SelectorError: If a selector is not a non-empty string or the sequence is empty.
    """
    items = [selectors] if isinstance(selectors, str) else list(selectors) if _is_sequence(selectors) else None
    if items is None:
        raise SelectorError(f"`{argument}` must be a string or a list of strings, got {selectors!r}; write {_FORMS}.")
    if not items:
        raise SelectorError(f"`{argument}` is an empty list; name at least one module or parameter.")
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise SelectorError(f"`{argument}` holds {item!r}; every selector must be {_FORMS}.")
        _compile(item)
    return items


def _is_sequence(value: object) -> bool:
    # OmegaConf ListConfig is a Sequence too; tensors and dicts are not selectors.
    return isinstance(value, Iterable) and not isinstance(value, str | bytes | dict | Tensor)


@functools.lru_cache(maxsize=1024)
def _compile(selector: str) -> re.Pattern[str]:
    if selector.startswith("re:"):
        try:
            return re.compile(selector[3:])
        except re.error as err:
            raise SelectorError(f"selector {selector!r} is not a valid regular expression ({err}).") from None
    if not any(ch in selector for ch in "*?["):
        return re.compile(re.escape(selector))
    # fnmatch's '*' crosses dots; ours stays inside one component so 'blocks.*' does not select 'blocks.0.fc'.
    pattern = fnmatch.translate(selector.replace("**", "\0"))
    pattern = pattern.replace(".*", "[^.]*").replace("\0", ".*")
    return re.compile(pattern)


def match_names(names: Sequence[str], selector: str) -> list[str]:
    """Return the names (in their given order) that ``selector`` matches, without raising.

    Example:
        >>> match_names(["a", "a.0", "a.1", "b"], "a.*")
        ['a.0', 'a.1']
    """
    pattern = _compile(selector)
    return [name for name in names if pattern.fullmatch(name)]


def _no_match(selector: str, names: Sequence[str], model: nn.Module, kind: str) -> SelectorError:
    stripped = selector[3:] if selector.startswith("re:") else selector
    close = difflib.get_close_matches(stripped, names, n=3, cutoff=0.4)
    if not close:  # fall back to names sharing the first component, then to the top-level names
        head = stripped.split(".")[0]
        close = [n for n in names if n.split(".")[0] == head][:3] or [n for n in names if "." not in n][:5]
    hint = f"did you mean {', '.join(repr(c) for c in close)}?" if close else "the model has no named submodules."
    return SelectorError(
        f"selector {selector!r} matched no {kind} of {type(model).__name__}; {hint} "
        f"A selector is {_FORMS}; print(dict(model.named_modules()).keys()) lists all names."
    )


def select_modules(model: nn.Module, selectors: Selectors) -> list[tuple[str, nn.Module]]:
    """Resolve selectors to ``(name, module)`` pairs in model order, without duplicates.

    The root module (name ``""``) is never selected. A module matched by several selectors appears once.

    Args:
        model: The model whose ``named_modules()`` are searched.
        selectors: One selector or several.

    Raises:
        SelectorError: If a selector matches no module; the message names the closest module names.
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    names = [name for name, _ in named]
    chosen: set[str] = set()
    for selector in as_selector_list(selectors):
        hits = match_names(names, selector)
        if not hits:
            raise _no_match(selector, names, model, "module")
        chosen.update(hits)
    return [(name, module) for name, module in named if name in chosen]


def select_parameters(model: nn.Module, selectors: Selectors) -> list[tuple[str, nn.Parameter]]:
    """Resolve selectors to ``(name, parameter)`` pairs in model order, without duplicates.

    A selector may name parameters (``"head.weight"``, ``"re:.*bias"``) or modules, which select
    every parameter under them. Shared parameters appear once, under their first name; parameters
    are compared by identity, never by value.

    Args:
        model: The model whose ``named_parameters()`` and ``named_modules()`` are searched.
        selectors: One selector or several.

    Raises:
        SelectorError: If a selector matches neither a parameter nor a module with parameters.
    """
    params = list(model.named_parameters())
    param_names = [name for name, _ in params]
    module_names = [name for name, _ in model.named_modules() if name]
    chosen: set[int] = set()
    for selector in as_selector_list(selectors):
        hits = {id(p) for name, p in params if name in set(match_names(param_names, selector))}
        for module_name in match_names(module_names, selector):
            hits.update(id(p) for p in model.get_submodule(module_name).parameters())
        if not hits:
            raise _no_match(selector, param_names + module_names, model, "parameter")
        chosen.update(hits)
    return [(name, p) for name, p in params if id(p) in chosen]


def outermost(names: Iterable[str]) -> list[str]:
    """Drop names that lie under another name of the collection (``"a.0"`` under ``"a"``), keeping order.

    Useful where attaching to both a module and its child would act twice (hooks, freezing, checkpointing).

    Example:
        >>> outermost(["a", "a.0", "b.1", "b.10"])
        ['a', 'b.1', 'b.10']
    """
    names = list(dict.fromkeys(names))
    kept = set(names)
    return [n for n in names if not any(n.startswith(other + ".") for other in kept if other != n)]
