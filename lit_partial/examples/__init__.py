"""Ready-made models and data for the main job, the tests and the benchmarks."""

from __future__ import annotations

from lit_partial.examples.digits import DigitsClassifier, DigitsDataModule
from lit_partial.examples.models import ConvBlock, DigitsCNN, FFNBlock, ResidualFFN

__all__ = ["ConvBlock", "DigitsCNN", "DigitsClassifier", "DigitsDataModule", "FFNBlock", "ResidualFFN"]
