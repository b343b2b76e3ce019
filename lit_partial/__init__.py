"""lit_partial: decide what takes part in backpropagation, per module, element, step and sample.

Example:
    >>> import lit_partial
    >>> "PartialBackpropMixin" in lit_partial.__all__
    True
"""

from __future__ import annotations

from lit_partial.attach import Handle, Handles, register_batch_transform, register_gate, wrap_forward
from lit_partial.callbacks import *  # noqa: F403
from lit_partial.callbacks import __all__ as _callbacks_all
from lit_partial.conditions import Condition, StepContext, parse_condition
from lit_partial.errors import (
    CheckpointMismatchError,
    ConditionError,
    ConfigurationError,
    LitPartialError,
    SelectorError,
)
from lit_partial.module import PartialBackpropMixin
from lit_partial.selectors import select_modules, select_parameters
from lit_partial.strategies import FSDP2Strategy
from lit_partial.summary import summarize

__version__ = "0.1.0"

__all__ = [
    "CheckpointMismatchError",
    "Condition",
    "ConditionError",
    "ConfigurationError",
    "FSDP2Strategy",
    "Handle",
    "Handles",
    "LitPartialError",
    "PartialBackpropMixin",
    "SelectorError",
    "StepContext",
    "parse_condition",
    "register_batch_transform",
    "register_gate",
    "select_modules",
    "select_parameters",
    "summarize",
    "wrap_forward",
    *_callbacks_all,
]
