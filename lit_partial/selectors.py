"""Selectors: strings that name modules and parameters of a model.

A selector is one of

* an exact name from ``named_modules()`` / ``named_parameters()``: ``"backbone.0"``, ``"head.weight"``;
* a glob: ``*`` matches within one dotted component, ``**`` across components, ``?`` one character and
  ``[0-3]`` a character class, so ``"blocks.*"`` names the blocks themselves, not their children;
* a regular expression written ``"re:<pattern>"``, matched against the whole name;
* a module class: ``"class:LlamaDecoderLayer"`` selects the modules whose class is called that (the name
  ``print(model)`` shows; subclasses with other names are not selected), ``"class:torch.nn.BatchNorm2d"`` (a
  dotted path) every instance of that class, subclasses included (``isinstance``, as composer's module surgery
  matches types). A path is looked up among the modules Python has imported already, never imported by a
  selector: a class the model uses is always there. Under FSDP2 a sharded module still answers to its class name.

Selecting a module selects everything under it; a class selector selects modules (and so their parameters).
A parameter shared by several modules (tied weights) is selected by any of its names. Names see through
wrappers that insert a component into every path (``torch.compile`` of a submodule adds ``_orig_mod``; FSDP1
and checkpoint wrappers add theirs):
``"backbone.0"`` also selects ``backbone._orig_mod.0``, and the other way round. Every function returns
matches in model order, without duplicates, in time linear in the model's size, and raises
:class:`SelectorError` naming the closest existing names when a selector matches nothing.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> [name for name, _ in select_modules(model, "re:[02]")]
    ['0', '2']
    >>> [name for name, _ in select_parameters(model, ["2", "0.bias"])]
    ['0.bias', '2.weight', '2.bias']
    >>> [name for name, _ in select_modules(model, ["class:torch.nn.ReLU", "class:Linear"])]
    ['0', '1', '2']
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import gc
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import Tensor, nn

from lit_partial._compat import module_class_names, named_tree
from lit_partial.errors import SelectorError

__all__ = [
    "CLASS_PREFIX",
    "SelectorError",
    "Selectors",
    "as_selector_list",
    "canonical_name",
    "count_match_operations",
    "describe_ties",
    "match_names",
    "outermost",
    "preview",
    "select_modules",
    "select_parameters",
    "select_submodules",
    "tied_parameter_names",
]

Selectors = str | Sequence[str]
"""One selector or a sequence of them."""

_FORMS = (
    "an exact name, a glob ('blocks.*' within one level, 'encoder.**' across levels), 're:<pattern>' or a module "
    "class ('class:LlamaDecoderLayer', 'class:torch.nn.BatchNorm2d')"
)
CLASS_PREFIX = "class:"
_CLASS_FORM = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


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
        if item.startswith(CLASS_PREFIX):
            _check_class_form(item, argument)
        else:
            _compile(item)
    return items


def _check_class_form(selector: str, argument: str) -> None:
    if not _CLASS_FORM.fullmatch(selector[len(CLASS_PREFIX) :]):
        raise SelectorError(
            f"`{argument}` holds {selector!r}; a class selector is 'class:' and a class name or dotted path, e.g. "
            "'class:LlamaDecoderLayer' or 'class:torch.nn.BatchNorm2d'."
        )


@functools.lru_cache(maxsize=256)
def _resolve_class(path: str) -> type | None:
    """The class a dotted path names, looked up in modules already imported (None if none has it)."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        found: object = sys.modules.get(".".join(parts[:split]))
        for attr in parts[split:]:
            found = getattr(found, attr, None)
        if isinstance(found, type):
            return found
    return None


def _class_test(selector: str) -> Callable[[type], bool]:
    """What a ``class:`` selector asks of a module's class (raises if a dotted path names no module class)."""
    spec = selector[len(CLASS_PREFIX) :]
    if "." not in spec:
        return lambda cls: spec in module_class_names(cls)
    target = _resolve_class(spec)
    if target is None:
        return lambda cls: False  # no imported module defines it, so no module of the model is one
    if not issubclass(target, nn.Module):
        raise SelectorError(f"selector {selector!r} names {target!r}, which is not a torch.nn.Module class.")
    return lambda cls: issubclass(cls, target)


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

    Raises:
        SelectorError: For a ``class:`` selector: names alone have no class (use :func:`select_modules`).
    """
    if selector.startswith(CLASS_PREFIX):
        raise SelectorError(
            f"selector {selector!r} needs the modules, not their names: use select_modules(model, ...)."
        )
    return _Names(names).match(selector)


def _is_exact(selector: str) -> bool:
    return not selector.startswith("re:") and not any(ch in selector for ch in "*?[")


class _Names:
    """Names to match selectors against: a pattern scans them once; an exact name is one dictionary lookup.

    So resolving ``k`` selectors costs ``k`` scans for patterns but only ``k`` lookups for exact names (what
    callbacks pass around after resolving once): linear in model size either way.
    """

    def __init__(self, names: Sequence[str], classes: Sequence[type] | None = None) -> None:
        self.names = names
        self.keys = [_unwrapped(name) for name in names]  # what selectors are matched against
        self.classes = classes  # the class of each named module; None: parameter names, which class: never matches
        self._exact: dict[str, list[str]] | None = None

    def match(self, selector: str) -> list[str]:
        if selector.startswith(CLASS_PREFIX):
            if self.classes is None:
                return []
            test = _class_test(selector)
            verdicts: dict[type, bool] = {}  # one test per distinct class: a model has few
            _count(len(self.names))
            hits = []
            for name, cls in zip(self.names, self.classes, strict=True):
                verdict = verdicts.get(cls)
                if verdict is None:
                    verdict = verdicts[cls] = test(cls)
                if verdict:
                    hits.append(name)
            return hits
        if _is_exact(selector):
            if self._exact is None:
                self._exact = {}
                for key, name in zip(self.keys, self.names, strict=True):
                    self._exact.setdefault(key, []).append(name)
            _count(1)
            return list(self._exact.get(_unwrapped(selector), []))
        fullmatch = _compile(_unwrapped(selector)).fullmatch
        _count(len(self.names))
        return [name for key, name in zip(self.keys, self.names, strict=True) if fullmatch(key)]


#: Module names that wrappers insert into parameter paths without being part of the user's model:
#: ``torch.compile`` of a submodule (``_orig_mod``), FSDP1 and activation-checkpoint wrappers.
WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def _unwrapped(name: str) -> str:
    """``name`` without wrapper components, so selectors see through them both ways."""
    if "_orig_mod" not in name and "_wrapped_module" not in name:  # the common case, without splitting
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_COMPONENTS)


def canonical_name(name: str) -> str:
    """The name without wrapper components: the same for a module whether or not a wrapper was inserted above it.

    Callbacks salt their random draws with it, so compiling a submodule in place does not change the draws.

    Example:
        >>> canonical_name("backbone._orig_mod.0.weight")
        'backbone.0.weight'
    """
    return _unwrapped(name)


class _MatchCounter:
    """Counts selector-against-name match operations: a deterministic measure of selection cost."""

    operations = 0


def _count(n: int) -> None:
    _MatchCounter.operations += n


@contextlib.contextmanager
def count_match_operations() -> Iterator[list[int]]:
    """Count the selector-against-name matches done inside the block (the count is ``box[0]`` afterwards).

    Selection does one match per (selector, name) pair, so the count grows linearly with model size.

    Example:
        >>> import torch.nn as nn
        >>> with count_match_operations() as box:
        ...     _ = select_modules(nn.Sequential(nn.Linear(1, 1), nn.ReLU()), "re:[01]")  # a pattern: 2 names
        ...     _ = select_modules(nn.Sequential(nn.Linear(1, 1), nn.ReLU()), "0")  # an exact name: 1 lookup
        >>> box[0]
        3
    """
    start = _MatchCounter.operations
    box = [0]
    try:
        yield box
    finally:
        box[0] = _MatchCounter.operations - start


def _no_class_match(selector: str, model: nn.Module) -> SelectorError:
    spec = selector[len(CLASS_PREFIX) :]
    classes = {type(m) for m in model.modules()}
    if "." in spec:
        present = sorted({f"{c.__module__}.{c.__qualname__}" for c in classes})
        last = spec.rpartition(".")[2]
        close = [p for p in present if p.rpartition(".")[2] == last] or difflib.get_close_matches(spec, present, 3)
        why = "" if _resolve_class(spec) is not None else f" (no imported module defines {spec!r})"
    else:
        present = sorted({name for c in classes for name in module_class_names(c)})
        close = difflib.get_close_matches(spec, present, n=3, cutoff=0.6)
        why = ""
    forms = [CLASS_PREFIX + name for name in close or present]
    hint = f"did you mean {', '.join(repr(c) for c in forms)}?" if close else f"its classes are {preview(forms, 8)}."
    return SelectorError(
        f"selector {selector!r} matched no module of {type(model).__name__}{why}; {hint} 'class:Name' matches a "
        "module's class name, 'class:package.module.Name' instances of that class (subclasses too)."
    )


def _no_match(selector: str, names: Sequence[str], model: nn.Module, kind: str) -> SelectorError:
    if selector.startswith(CLASS_PREFIX):
        return _no_class_match(selector, model)
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
    index = _Names(names, [type(module) for _, module in named])
    chosen: set[str] = set()
    for selector in as_selector_list(selectors):
        hits = index.match(selector)
        if not hits:
            raise _no_match(selector, names, model, "module")
        chosen.update(hits)
    return [(name, module) for name, module in named if name in chosen]


def select_submodules(
    model: nn.Module, selectors: Selectors, *, missing_ok: bool = False
) -> list[tuple[str, nn.Module]]:
    """The selected modules and every module under them, in model order, without duplicates.

    Linear in the number of modules (one prefix lookup per name component). With ``missing_ok``, selectors
    that match no module (e.g. parameter names) are skipped instead of raising.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Sequential(nn.Linear(1, 1)), nn.ReLU())
        >>> [name for name, _ in select_submodules(model, "0")]
        ['0', '0.0']
    """
    named = [(name, module) for name, module in model.named_modules() if name]
    if missing_ok:
        index = _Names([name for name, _ in named], [type(module) for _, module in named])
        chosen = {hit for selector in as_selector_list(selectors) for hit in index.match(selector)}
    else:
        chosen = {name for name, _ in select_modules(model, selectors)}
    return [(name, module) for name, module in named if _under(name, chosen)]


def _under(name: str, chosen: set[str]) -> bool:
    """Whether ``name`` or one of its ancestors (``"a"``, ``"a.b"`` for ``"a.b.c"``) is in ``chosen``."""
    return any(ancestor in chosen for ancestor in _ancestors(name))


def _ancestors(name: str) -> Iterator[str]:
    """``name`` and its ancestors, outermost first: ``"a"``, ``"a.b"``, ``"a.b.c"`` for ``"a.b.c"`` (none for "")."""
    end = name.find(".")
    while end != -1:
        yield name[:end]
        end = name.find(".", end + 1)
    if name:
        yield name


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector inside the block (restored after it; nesting is fine).

    Setup makes a few small objects per parameter tensor. With the collector running, each full collection
    scans the whole heap, and a model with tens of thousands of tensors triggers enough of them to make
    setup grow quadratically: measured on 10k and 40k tensors, LayerFreezing's setup went from 0.68 s to
    2.5 s with the collector and from 0.34 s to 1.7 s without it. Nothing made in setup is cyclic garbage.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@gc_paused()
def select_parameters(model: nn.Module, selectors: Selectors) -> list[tuple[str, nn.Parameter]]:
    """Resolve selectors to ``(name, parameter)`` pairs in model order, without duplicates.

    A selector may name parameters (``"head.weight"``, ``"re:.*bias"``) or modules, which select
    every parameter under them. A parameter shared by several modules (tied weights) is selected by any
    of its names and appears once, under its first name; parameters are compared by identity, never by
    value. Linear in model size: one match per (selector, name) and one prefix lookup per name component.

    Args:
        model: The model whose ``named_parameters()`` and ``named_modules()`` are searched.
        selectors: One selector or several.

    Raises:
        SelectorError: If a selector matches neither a parameter nor a module with parameters.
    """
    module_names, aliases = named_tree(model)
    canonical: dict[int, tuple[str, nn.Parameter]] = {}
    for name, p in aliases:
        canonical.setdefault(id(p), (name, p))
    by_name = dict(aliases)
    selectors = as_selector_list(selectors)
    classes = None
    if any(selector.startswith(CLASS_PREFIX) for selector in selectors):  # one more walk, in named_tree's order
        classes = [type(m) for name, m in model.named_modules(remove_duplicate=False) if name]
    param_index, module_index = _Names([name for name, _ in aliases]), _Names(module_names, classes)
    matched = [
        (selector, {id(by_name[name]) for name in param_index.match(selector)}, module_index.match(selector))
        for selector in selectors
    ]
    # A module selects every parameter under it: one pass over the parameters for all selectors together
    # (a pass per selector was quadratic for long lists of exact names, e.g. the bottom half of 100 layers).
    selected_modules = {m for _, _, modules in matched for m in modules}
    under: dict[str, set[int]] = {}
    if selected_modules:
        for name, p in aliases:
            for ancestor in _ancestors(name.rpartition(".")[0]):
                if ancestor in selected_modules:
                    under.setdefault(ancestor, set()).add(id(p))
    chosen: set[int] = set()
    for selector, hits, modules in matched:
        for module in modules:
            hits |= under.get(module, set())
        if not hits:
            params = [name for name, _ in canonical.values()]
            raise _no_match(selector, params + [n for n in module_names if n not in set(params)], model, "parameter")
        chosen.update(hits)
    return [(name, p) for key, (name, p) in canonical.items() if key in chosen]


def preview(names: Sequence[str], limit: int = 4) -> str:
    """A short rendering of a possibly long list of names, for log lines.

    Example:
        >>> preview([f"blocks.{i}" for i in range(100)])
        "['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3', ... 96 more]"
    """
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}, ... {len(names) - limit} more]" if len(names) > limit else f"[{shown}]"


def tied_parameter_names(model: nn.Module) -> list[list[str]]:
    """The names of every parameter known under several names (tied weights), first name first, in model order.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.ModuleDict({"embed": nn.Embedding(4, 2), "head": nn.Linear(2, 4, bias=False)})
        >>> model.head.weight = model.embed.weight
        >>> tied_parameter_names(model)
        [['embed.weight', 'head.weight']]
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [aliases for aliases in names.values() if len(aliases) > 1]


def describe_ties(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]]) -> list[str]:
    """For each of ``params`` that is tied, ``"'a' is tied to 'b'"``: for messages of callbacks that select it.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.ModuleDict({"embed": nn.Embedding(4, 2), "head": nn.Linear(2, 4, bias=False)})
        >>> model.head.weight = model.embed.weight
        >>> describe_ties(model, select_parameters(model, "head.weight"))
        ["'embed.weight' is tied to 'head.weight' (one tensor: what is done to it holds under every name)"]
    """
    tied = {name: aliases for aliases in tied_parameter_names(model) for name in aliases[:1]}
    return [
        f"{name!r} is tied to {', '.join(repr(a) for a in tied[name][1:])} (one tensor: what is done to it holds "
        "under every name)"
        for name, _ in params
        if name in tied
    ]


def outermost(names: Iterable[str]) -> list[str]:
    """Drop names that lie under another name of the collection (``"a.0"`` under ``"a"``), keeping order.

    Useful where attaching to both a module and its child would act twice (hooks, freezing, checkpointing).

    Example:
        >>> outermost(["a", "a.0", "b.1", "b.10"])
        ['a', 'b.1', 'b.10']
    """
    names = list(dict.fromkeys(names))
    kept = set(names)
    return [n for n in names if not _under(n.rpartition(".")[0], kept)]
