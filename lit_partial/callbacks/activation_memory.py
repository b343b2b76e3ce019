"""Deprecated alias of :mod:`lit_partial.callbacks.activation_memory_monitor` (the module holds the monitor).

``from lit_partial.callbacks.activation_memory import ActivationMemoryMonitor`` keeps working, with a
``DeprecationWarning`` naming the new module; the class is the very same object (``lit_partial.ActivationMemoryMonitor``
is the import to use).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from lit_partial.callbacks import activation_memory_monitor as _monitor

if TYPE_CHECKING:  # type checkers see the names themselves
    from lit_partial.callbacks.activation_memory_monitor import *  # noqa: F403

__all__ = list(_monitor.__all__)


def __getattr__(name: str) -> Any:
    value = getattr(_monitor, name)
    warnings.warn(
        f"lit_partial.callbacks.activation_memory is deprecated; import {name} from "
        "lit_partial.callbacks.activation_memory_monitor (or lit_partial) instead.",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
