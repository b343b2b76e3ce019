"""Hydra hands constructors ``DictConfig``/``ListConfig``; the library works on plain containers."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["to_plain"]


def to_plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (interpolations resolved); anything else unchanged.

    Example:
        >>> to_plain(OmegaConf.create({"epochs": [0, 3]}))
        {'epochs': [0, 3]}
    """
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value
