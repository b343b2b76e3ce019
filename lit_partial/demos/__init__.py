"""Importable demo models and data (Lightning's `demos`): the main job's, the tests' and the benchmarks'."""

from __future__ import annotations

from lit_partial.demos.digits import DigitsClassifier, DigitsDataModule
from lit_partial.demos.models import ConvBlock, DigitsCNN, FFNBlock, ResidualConvBlock, ResidualFFN
from lit_partial.demos.recurrent import DigitsRNN

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
