"""lit_partial: decide what takes part in backpropagation, per module, element, step and sample.

Example:
    >>> import lit_partial
    >>> "PartialBackpropMixin" in lit_partial.__all__
    True
"""

from __future__ import annotations

from lit_partial.callbacks import *  # noqa: F403
from lit_partial.callbacks import __all__ as _callbacks_all
from lit_partial.conditions import Condition, ConditionError, StepContext, parse_condition
from lit_partial.module import PartialBackpropMixin, register_batch_transform, register_gate
from lit_partial.selection import SelectorError, select_modules, select_parameters
from lit_partial.summary import summarize

__version__ = "0.1.0"

__all__ = [
    "Condition",
    "ConditionError",
    "PartialBackpropMixin",
    "SelectorError",
    "StepContext",
    "parse_condition",
    "register_batch_transform",
    "register_gate",
    "select_modules",
    "select_parameters",
    "summarize",
    *_callbacks_all,
]
