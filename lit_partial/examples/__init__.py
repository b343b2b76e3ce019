"""Ready-made models and data for the main job, the tests and the benchmarks."""

from __future__ import annotations

from lit_partial.examples.digits import DigitsClassifier, DigitsDataModule
from lit_partial.examples.models import ConvBlock, DigitsCNN, FFNBlock, ResidualConvBlock, ResidualFFN
from lit_partial.examples.recurrent import DigitsRNN

__all__ = [
    "ConvBlock",
    "DigitsCNN",
    "DigitsClassifier",
    "DigitsDataModule",
    "DigitsRNN",
    "FFNBlock",
    "ResidualConvBlock",
    "ResidualFFN",
]
