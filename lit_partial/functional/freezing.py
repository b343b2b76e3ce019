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

from torch import nn

from lit_partial._compat import is_running_stats_norm

__all__ = [
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
