"""A model with a bug in ``training_step``: its error must keep the full traceback (not a configuration error)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lit_partial.examples import DigitsClassifier


class BuggyClassifier(DigitsClassifier):
    """DigitsClassifier whose first training step divides by zero."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        raise ZeroDivisionError("a bug in training_step")
