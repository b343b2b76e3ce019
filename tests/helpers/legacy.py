"""Checkpoints made by earlier code: the runs behind ``tests/fixtures/*.ckpt`` and how to repeat them.

Each case is a technique configuration on :class:`~tests.helpers.models.TinyNet` (``torch.manual_seed(0)``,
:func:`~tests.helpers.models.tiny_loader`, 4 steps per epoch). ``tests/fixtures/make_legacy.py`` ran each case
for :data:`SAVED_EPOCHS` epochs with the code of the day and saved the checkpoint; the test resumes it with
today's code for :data:`RESUMED_EPOCHS` epochs and compares with an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lit_partial import (
    ActivationDetach,
    ConditionalDetach,
    ConditionalSkip,
    GradientMasking,
    LayerFreezing,
    SelectiveBackprop,
    StochasticDepth,
)
from tests.helpers.models import TinyNet

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
SAVED_EPOCHS, RESUMED_EPOCHS = 1, 3


class ScoredTinyNet(TinyNet):
    """:class:`TinyNet` with ``per_sample_loss`` (what ``SelectiveBackprop`` scores samples with)."""

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y, reduction="none").mean(1)


CASES: dict[str, tuple[Callable[[], list[Callback]], type[TinyNet]]] = {
    "layer_freezing": (
        lambda: [
            LayerFreezing(
                frozen=["stem", "blocks.0"],
                schedule=[
                    {"epoch": 1, "unfreeze": "blocks.0"},
                    {"when": {"all": [{"epochs": [2, None]}, {"every_n_steps": 1}]}, "unfreeze": "stem"},
                ],
            )
        ],
        TinyNet,
    ),
    "conditional_detach": (
        lambda: [
            ConditionalDetach(
                {"stem": {"when": {"probability": 0.5, "seed": 3}}, "features": {"when": "always", "grad_scale": 0.5}}
            )
        ],
        TinyNet,
    ),
    "activation_detach": (lambda: [ActivationDetach(at={"blocks.0": {"every_n_steps": 2}})], TinyNet),
    "gradient_masking": (lambda: [GradientMasking({"stem.weight": {"kind": "rows", "index": [1, 3]}})], TinyNet),
    "selective_backprop": (lambda: [SelectiveBackprop(keep=0.5, method="probability", seed=1)], ScoredTinyNet),
    "stochastic_depth": (
        lambda: [
            StochasticDepth(blocks="blocks.[01]", drop_rate=0.5, seed=2),
            ConditionalSkip({"blocks.2": {"when": {"probability": 0.5}, "per_sample": True}}),
        ],
        TinyNet,
    ),
}


def new_model(case: str) -> TinyNet:
    """The case's model, initialised as every run of it is."""
    torch.manual_seed(0)
    return CASES[case][1]()
