"""Setup cost in model size: selector resolution and every callback's ``setup`` on 1k to 100k parameter tensors.

A synthetic model of ``N / 2`` blocks (each a ``Linear(1, 1)``: a weight and a bias) isolates the cost that grows
with the number of parameter tensors, which is what a large pretrained model has thousands of. Each callback
selects every block's weight (``blocks.*.weight``) or the blocks themselves, the worst case for resolution.
Times are single runs (setup runs once per fit); the claim is the per-tensor cost staying flat as N grows.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from benchmarks._common import Section
from lit_partial import (
    ActivationDetach,
    ConditionalDetach,
    ConditionalSkip,
    GradientMasking,
    LayerFreezing,
    PartialBackpropMixin,
    SelectiveBackprop,
)
from lit_partial.selectors import count_match_operations, select_parameters

REQUIRES: tuple[str, ...] = ()  # optional packages, checked before any section runs


class Wide(PartialBackpropMixin, L.LightningModule):
    """``blocks.0 ... blocks.{n-1}``, each a Linear(1, 1), and a ``head``; mixin for the callbacks that need it."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(1, 1) for _ in range(blocks))
        self.head = nn.Linear(1, 1)

    def per_sample_loss(self, batch: Any) -> torch.Tensor:  # noqa: D102 - SelectiveBackprop checks it exists
        return batch[0].sum(1)


CALLBACKS: dict[str, Callable[[], L.Callback]] = {
    "LayerFreezing": lambda: LayerFreezing(frozen="blocks.*", schedule=[{"epoch": 1, "unfreeze": "blocks.0"}]),
    "GradientMasking": lambda: GradientMasking({"blocks.*.weight": {"kind": "rows", "index": [0]}}),
    "ConditionalDetach": lambda: ConditionalDetach({"blocks.*": {"every_n_steps": 2}}),
    "ConditionalSkip": lambda: ConditionalSkip({"blocks.*": {"probability": 0.1}}),
    "ActivationDetach": lambda: ActivationDetach(checkpoint="blocks.*"),
    "SelectiveBackprop": lambda: SelectiveBackprop(keep=0.5),
}


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> Section:
    """Time selection and each callback's setup at growing model sizes."""
    sizes = [1_000, 10_000] if args.quick else [1_000, 10_000, 100_000]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    rows = []
    for tensors in sizes:
        model = Wide(tensors // 2)
        with count_match_operations() as box:
            select_time = _seconds(lambda model=model: select_parameters(model, ["blocks.*.weight", "blocks.1"]))
        row: dict[str, Any] = {"parameter tensors": tensors, "select (s)": select_time, "match ops": box[0]}
        for name, make in CALLBACKS.items():
            callback = make()
            row[f"{name} setup (s)"] = _seconds(lambda c=callback, m=model: c.setup(trainer, m, "fit"))
            callback.teardown(trainer, model, "fit")
        rows.append(row)
    largest, smallest = rows[-1], rows[0]
    scale = largest["parameter tensors"] / smallest["parameter tensors"]
    slowest = max((k for k in largest if k.endswith("(s)")), key=lambda k: largest[k] / max(smallest[k], 1e-9))
    notes = [
        f"{scale:g}x the tensors costs {largest['match ops'] / smallest['match ops']:.2f}x the match operations "
        f"(one per selector and name) and {largest['select (s)'] / smallest['select (s)']:.1f}x the selection time.",
        f"Largest growth over the {scale:g}x range: {slowest}, {largest[slowest] / max(smallest[slowest], 1e-9):.1f}x "
        "(linear = the same factor as the tensors).",
    ]
    return Section("Setup time in model size (linear)", rows, notes)
