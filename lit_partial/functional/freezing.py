"""Freezing: take modules out of training so that no optimizer can move them, and put them back.

A frozen parameter has ``requires_grad=False`` and ``.grad = None``. The second half matters: torch
optimizers skip parameters whose gradient is ``None``, so momentum, Adam moments and weight decay cannot
move a frozen parameter, while a zeroed (not ``None``) gradient would still let them drift.

Normalization layers with running statistics (BatchNorm, InstanceNorm with ``track_running_stats``) inside
a frozen module are put in eval mode, so their statistics stay fixed too, unless ``train_bn=True``.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    >>> frozen = freeze(model[:2])
    >>> frozen_parameter_names(model)
    ['0.weight', '0.bias', '1.weight', '1.bias']
    >>> model.train(); model[1].training  # doctest: +ELLIPSIS
    Sequential(...)
    True
    >>> hold_norm_statistics(model[:2])
    1
    >>> unfreeze(model[:2]) and frozen_parameter_names(model)
    []
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from lit_partial._compat import is_running_stats_norm
from lit_partial.errors import ConfigurationError
from lit_partial.selectors import outermost, select_modules

__all__ = [
    "BlockStack",
    "find_block_stack",
    "freeze",
    "frozen_parameter_names",
    "hold_eval",
    "hold_norm_statistics",
    "norm_layers",
    "norm_parameter_ids",
    "set_requires_grad",
    "trainable_parameter_count",
    "unfreeze",
]


def norm_layers(module: nn.Module) -> list[nn.Module]:
    """The modules under (and including) ``module`` that keep running statistics (BatchNorm, InstanceNorm)."""
    return [m for m in module.modules() if is_running_stats_norm(m)]


def norm_parameter_ids(module: nn.Module) -> set[int]:
    """Identities of the affine parameters of the running-statistics norm layers under ``module``.

    What ``train_bn=True`` keeps trainable when freezing (Lightning ``BaseFinetuning``'s default).
    """
    return {id(p) for m in norm_layers(module) for p in m.parameters()}


def hold_eval(modules: Iterable[nn.Module]) -> int:
    """Put each of ``modules`` (itself, not its children) in eval mode; returns how many were in train mode.

    Cheap enough for every step: it only flips ``training`` flags.
    """
    flipped = 0
    for m in modules:
        if m.training:
            m.train(False)
            flipped += 1
    return flipped


def set_requires_grad(params: Iterable[nn.Parameter], requires_grad: bool) -> int:
    """Set ``requires_grad`` of ``params``; when freezing, also drop their ``.grad``. Returns the count changed."""
    changed = 0
    for p in params:
        if p.requires_grad != requires_grad:
            changed += 1
        p.requires_grad_(requires_grad)
        if not requires_grad:
            # None, not zeros: optimizers skip None gradients, so momentum and weight decay stop too.
            p.grad = None
    return changed


def hold_norm_statistics(module: nn.Module) -> int:
    """Put the running-statistics norm layers of ``module`` in eval mode; returns how many were in train mode.

    Cheap enough to call every step: it only flips ``training`` flags. Lightning and user code call
    ``model.train()`` at epoch starts and after validation, which would otherwise resume updating them.
    """
    return hold_eval(norm_layers(module))


def freeze(module: nn.Module, train_bn: bool = False) -> list[nn.Parameter]:
    """Freeze every parameter of ``module``: ``requires_grad=False`` and ``.grad=None``.

    Args:
        module: The module to freeze (all its descendants included).
        train_bn: If True, norm layers with running statistics keep learning: their affine parameters stay
            trainable and they stay in train mode (Lightning ``BaseFinetuning``'s default). If False (ours),
            they are frozen and put in eval mode, so frozen means fixed, statistics included.

    Returns:
        The parameters that were frozen.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> len(freeze(layer)), layer.weight.requires_grad, layer.weight.grad
        (2, False, None)
    """
    keep = norm_parameter_ids(module) if train_bn else set()
    params = [p for p in module.parameters() if id(p) not in keep]
    set_requires_grad(params, False)
    if not train_bn:
        hold_norm_statistics(module)
    return params


def unfreeze(module: nn.Module) -> list[nn.Parameter]:
    """Make every parameter of ``module`` trainable; norm layers follow ``module.training`` again.

    Returns:
        The parameters of ``module`` (all now ``requires_grad=True``).

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> _ = freeze(layer)
        >>> all(p.requires_grad for p in unfreeze(layer))
        True
    """
    params = list(module.parameters())
    set_requires_grad(params, True)
    for m in norm_layers(module):
        m.train(module.training)
    return params


def frozen_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters of ``model`` that do not require gradients, in model order."""
    return [name for name, p in model.named_parameters() if not p.requires_grad]


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of parameter elements of ``model`` that require gradients (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass(frozen=True)
class BlockStack:
    """A model's repeated block stack and what lies before and after it (selectors, in model order).

    Attributes:
        container: The ``ModuleList`` / ``Sequential`` that holds the blocks.
        blocks: Its children with parameters, bottom (input side) first.
        below: Outermost modules (or parameters) whose parameters all come before the blocks: embeddings, stem.
        above: The same after the blocks: final norm, head.
    """

    container: str
    blocks: list[str]
    below: list[str]
    above: list[str]


def find_block_stack(model: nn.Module, stack: str | None = None) -> BlockStack:
    """The repeated blocks of ``model``, and what comes before and after them.

    The blocks are the children with parameters of the longest ``ModuleList`` / ``Sequential`` whose children
    with parameters are all of one class (the first such in model order on a tie), or of the container ``stack``.

    Linear in model size: one pass over the modules (bottom-up, for which hold parameters) and one over the
    parameters. Parameters are placed by their first name (tied weights count where they first appear).

    Raises:
        ConfigurationError: If no container holds two or more same-class blocks (name it with ``stack``), or
            ``stack`` holds no child with parameters.
        SelectorError: If ``stack`` names no module.

    Example:
        >>> blocks = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        >>> find_block_stack(nn.Sequential(nn.Embedding(8, 4), blocks, nn.Linear(4, 2)))
        BlockStack(container='1', blocks=['1.0', '1.2'], below=['0'], above=['2'])
    """
    modules = list(model.named_modules())
    has_params: dict[int, bool] = {}
    for _, module in reversed(modules):  # children come after their parent in named_modules: bottom-up
        own = next(module.parameters(recurse=False), None) is not None
        has_params[id(module)] = own or any(has_params.get(id(c), False) for c in module.children())
    if stack is not None:
        ((container, holder),) = select_modules(model, stack)[:1]
        blocks = _blocks(container, holder, has_params)
        if not blocks:
            raise ConfigurationError(f"`stack` {stack!r} holds no child with parameters; name the block container.")
    else:
        best: tuple[str, list[str]] | None = None
        for name, module in modules:
            if isinstance(module, nn.ModuleList | nn.Sequential):
                kids = [c for c in module.children() if has_params[id(c)]]
                if len(kids) >= 2 and len({type(c) for c in kids}) == 1 and (best is None or len(kids) > len(best[1])):
                    best = (name, _blocks(name, module, has_params))
        if best is None:
            raise ConfigurationError(
                f"{type(model).__name__} has no ModuleList or Sequential of two or more blocks of one class; name "
                "the container of its blocks, e.g. stack='backbone' (its children with parameters, bottom first)."
            )
        container, blocks = best
    below, above = _around(model, blocks)
    return BlockStack(container, blocks, below, above)


def _blocks(name: str, container: nn.Module, has_params: dict[int, bool]) -> list[str]:
    prefix = f"{name}." if name else ""
    return [prefix + child for child, module in container.named_children() if has_params[id(module)]]


def _around(model: nn.Module, blocks: list[str]) -> tuple[list[str], list[str]]:
    """Selectors of what comes before and after ``blocks`` in parameter order.

    Each is the outermost module whose parameters all lie on that side, or the parameter's own name.
    """
    block_names = set(blocks)
    side: dict[str, int] = {}  # parameter name -> -1 before the blocks, 0 in a block, 1 after them
    seen_block = False
    for name, _ in model.named_parameters():
        in_block = any(ancestor in block_names for ancestor in _ancestors(name))
        seen_block = seen_block or in_block
        side[name] = 0 if in_block else 1 if seen_block else -1
    sides: dict[str, set[int]] = {}  # module name -> the sides of the parameters under it
    for name, where in side.items():
        for ancestor in _ancestors(name):
            sides.setdefault(ancestor, set()).add(where)
    found: dict[int, list[str]] = {-1: [], 1: []}
    for name, where in side.items():
        if where:
            pure = (a for a in _ancestors(name) if sides[a] == {where})
            found[where].append(next(pure, name))
    return outermost(found[-1]), outermost(found[1])


def _ancestors(name: str) -> list[str]:
    """The modules above parameter ``name``, outermost first: ``["a", "a.b"]`` for ``"a.b.weight"``."""
    parts = name.split(".")[:-1]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
