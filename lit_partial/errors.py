"""The errors lit_partial raises when it is configured or used wrongly.

Every one of them derives from :class:`LitPartialError`, and each also derives from the built-in
exception a caller would expect (``ValueError`` for a bad value, ``TypeError`` for a wrong kind of
object, ``RuntimeError`` for a state that cannot work), so ``except ValueError`` keeps working.
Their messages name the bad value, what was expected and the fix: an application (such as
``scripts/train.py``) may show them as one line, without a traceback. Anything else raised while
training (a bug in a user's model, an error inside torch) is not one of these and keeps its traceback.

Example:
    >>> issubclass(SelectorError, LitPartialError) and issubclass(SelectorError, ValueError)
    True
"""

from __future__ import annotations

__all__ = [
    "CheckpointMismatchError",
    "ConditionError",
    "ConfigurationError",
    "IncompatibleModuleError",
    "LitPartialError",
    "MaskError",
    "SelectorError",
    "UnsafeCheckpointError",
    "UnsupportedBatchError",
    "UnsupportedStrategyError",
    "UnsupportedStructureError",
    "UsageError",
]


class LitPartialError(Exception):
    """Base of every error that means "lit_partial is configured or used wrongly"; the message says the fix."""


class ConfigurationError(LitPartialError, ValueError):
    """An argument or configuration value is invalid (wrong value, wrong type of value, inconsistent options)."""


class UsageError(LitPartialError, TypeError):
    """An object of the wrong kind was handed to lit_partial (e.g. a model without the mixin a callback needs)."""


class SelectorError(ConfigurationError):
    """A selector is malformed or matches nothing; the message names the closest existing names."""


class ConditionError(ConfigurationError):
    """A condition spec is malformed; the message lists the valid forms."""


class MaskError(ConfigurationError):
    """A mask or mask spec is invalid; the message names the parameter or spec and the fix."""


class CheckpointMismatchError(ConfigurationError):
    """A checkpoint was made with a configuration different from this run's; the message names what changed."""


class UnsupportedStrategyError(LitPartialError, RuntimeError):
    """The trainer's strategy is one a callback cannot make correct."""


class UnsupportedStructureError(UsageError):
    """A value holds an object lit_partial cannot look inside (so a tensor in it would be missed); names its type."""


class UnsupportedBatchError(UnsupportedStructureError):
    """A batch (or part of it) is not something that can be sliced along the first dimension."""


class IncompatibleModuleError(LitPartialError, RuntimeError):
    """A selected module cannot take the technique (e.g. a skipped module whose output differs from its input)."""


class UnsafeCheckpointError(IncompatibleModuleError):
    """A checkpointed module cannot be recomputed faithfully (e.g. it modifies its input in place)."""
