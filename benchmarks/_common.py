"""Shared benchmark tools: side-by-side timing, the 8-block FFN setup, result containers."""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lit_partial.demos.models import ResidualFFN


@dataclass
class Section:
    """One benchmark section: a title, table rows (dicts with the same keys), notes, and optional plots."""

    title: str
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # file names written into the output folder

    def markdown(self) -> str:
        """The section as a markdown table with its notes."""
        lines = [f"### {self.title}", ""]
        if self.rows:
            keys = list(self.rows[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in self.rows]
        lines += ["", *[f"- {note}" for note in self.notes]]
        lines += [f"![{name}]({name})" for name in self.plots]
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def ffn_setup(
    num_blocks: int = 8, width: int = 384, batch: int = 256, seed: int = 0, device: str = "cpu"
) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The benchmark model of every issue: ``ResidualFFN(8 blocks, width 384)`` and a batch of 256."""
    torch.manual_seed(seed)
    model = ResidualFFN(num_blocks=num_blocks, width=width).to(device)
    x = torch.randn(batch, width, device=device)
    y = torch.randn(batch, width, device=device)
    return model, x, y


def time_side_by_side(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    rounds: int = 7,
    iters: int = 10,
    reduce: Literal["median", "min"] = "median",
    order_offset: int = 0,
) -> dict[str, float]:
    """Seconds per call of each function, measured in interleaved rounds whose order rotates every round.

    Interleaving (A, B, C, B, C, A, ...) means drift in machine load hits every variant alike, so the ratios
    between them are meaningful even on a shared machine; absolute times are not. ``reduce="min"`` reports
    each variant's best round: noise on a shared CPU only ever adds time, so the best round is the closest
    to the true cost. ``order_offset`` rotates the order of the first round (for callers that run one round at a
    time and want the rotation to continue).
    """
    names = list(fns)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(order_offset, order_offset + rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            _sync()
            start = time.perf_counter()
            for _ in range(iters):
                fns[name]()
            _sync()
            samples[name].append((time.perf_counter() - start) / iters)
    pick = min if reduce == "min" else statistics.median
    return {name: pick(values) for name, values in samples.items()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def quiet() -> None:
    """Keep the banners and warnings of many short ``Trainer.fit`` runs out of the report."""
    for pattern in (".*does not have many workers.*", ".*val_check_interval.*", ".*LeafSpec.*", ".*logging interval.*"):
        warnings.filterwarnings("ignore", pattern)
    warnings.filterwarnings("ignore", ".*checkpointing.*deprecated.*", category=FutureWarning)
    for name in ("lightning.pytorch", "lightning.fabric", "lit_partial"):
        logging.getLogger(name).setLevel(logging.ERROR)
