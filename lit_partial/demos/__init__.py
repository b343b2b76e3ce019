"""Importable demo models and data (Lightning's `demos`): the main job's, the tests' and the benchmarks'."""

from __future__ import annotations

from lit_partial.demos.digits import DigitsClassifier, DigitsDataModule
from lit_partial.demos.lm import ByteLM
from lit_partial.demos.models import ConvBlock, DigitsCNN, FFNBlock, ResidualConvBlock, ResidualFFN
from lit_partial.demos.recurrent import DigitsRNN
from lit_partial.demos.text import TextDataModule

__all__ = [
    "ByteLM",
    "ConvBlock",
    "DigitsCNN",
    "DigitsClassifier",
    "DigitsDataModule",
    "DigitsRNN",
    "FFNBlock",
    "ResidualConvBlock",
    "ResidualFFN",
    "TextDataModule",
]
