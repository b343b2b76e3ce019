"""Deprecated alias of :mod:`lit_partial.selectors` (module selectors; "selection" also meant sample selection).

Every name is still importable from here and is the very same object; importing one from outside the library warns
with a ``DeprecationWarning`` naming :mod:`lit_partial.selectors`.
"""

from __future__ import annotations

import inspect
import warnings
from typing import TYPE_CHECKING, Any

from lit_partial import selectors as _selectors

if TYPE_CHECKING:  # type checkers see the names themselves
    from lit_partial.selectors import *  # noqa: F403

__all__ = list(_selectors.__all__)


def __getattr__(name: str) -> Any:
    value = getattr(_selectors, name)  # AttributeError for names selectors does not have either
    frame = inspect.currentframe()
    caller = frame.f_back.f_globals.get("__name__", "") if frame is not None and frame.f_back is not None else ""
    if not caller.startswith("lit_partial."):  # the library's own modules are moved over as they are edited
        warnings.warn(
            f"lit_partial.selection is deprecated; import {name} from lit_partial.selectors instead.",
            DeprecationWarning,
            stacklevel=2,
        )
    return value
