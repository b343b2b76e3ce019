"""Deprecated alias of :mod:`lit_partial.demos` (Lightning's name for importable demo models).

``from lit_partial.examples import DigitsClassifier``, ``lit_partial.examples.models`` and the ``_target_`` paths
of old configs (``lit_partial.examples.DigitsClassifier``) keep working, with a ``DeprecationWarning`` naming
:mod:`lit_partial.demos`; the classes are the very same objects.
"""

from __future__ import annotations

import sys
import warnings

from lit_partial import demos
from lit_partial.demos import *  # noqa: F403
from lit_partial.demos import __all__ as __all__
from lit_partial.demos import digits, models, recurrent

warnings.warn(
    "lit_partial.examples is deprecated and will be removed; import lit_partial.demos instead "
    "(and write _target_: lit_partial.demos.<Class> in configs).",
    DeprecationWarning,
    stacklevel=2,
)

# `import lit_partial.examples.models` finds the demos' modules themselves (no second copy of any class).
for _module in (digits, models, recurrent):
    sys.modules[f"{__name__}.{_module.__name__.rpartition('.')[2]}"] = _module
del _module, demos
