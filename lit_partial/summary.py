"""What takes part in backprop: parameter counts per top-level module.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> model[0].requires_grad_(False)  # doctest: +ELLIPSIS
    Linear(...)
    >>> [(r.name, r.total, r.trainable) for r in summarize(model)]
    [('0', 6, 0), ('1', 3, 3), ('total', 9, 3)]
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import nn

__all__ = ["SummaryRow", "format_summary", "record_masked", "summarize"]

# model -> {parameter name: masked elements}; kept beside the model (not in it) so it outlives teardown
_masked: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()


def record_masked(model: nn.Module, counts: dict[str, int]) -> None:
    """Tell :func:`summarize` how many elements of each named parameter of ``model`` are masked (frozen)."""
    _masked.setdefault(model, {}).update(counts)


@dataclass(frozen=True)
class SummaryRow:
    """Parameter counts of one top-level module (or the ``total`` row)."""

    name: str
    total: int
    trainable: int
    masked: int


def summarize(model: nn.Module) -> list[SummaryRow]:
    """Count parameters per top-level module: total, trainable (``requires_grad``) and masked elements.

    Masked counts come from callbacks that mask elements (``GradientMasking``); trainable counts include
    masked elements of trainable parameters. Shared parameters count once, at their first name.
    """
    masked = _masked.get(model, {})
    counts: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        top = name.split(".")[0] if "." in name else name
        row = counts.setdefault(top, [0, 0, 0])
        row[0] += param.numel()
        row[1] += param.numel() if param.requires_grad else 0
        row[2] += masked.get(name, 0)
    rows = [SummaryRow(name, *values) for name, values in counts.items()]
    rows.append(SummaryRow("total", *(sum(col) for col in zip(*counts.values(), strict=True)) if counts else (0, 0, 0)))
    return rows


def format_summary(rows: list[SummaryRow]) -> str:
    """Render :func:`summarize` rows as a fixed-width text table."""
    header = ("module", "params", "trainable", "masked", "trainable %")
    body = [
        (
            r.name,
            f"{r.total:,}",
            f"{r.trainable:,}",
            f"{r.masked:,}",
            f"{100.0 * r.trainable / r.total:.1f}" if r.total else "-",
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            str(cell).rjust(w) if i else str(cell).ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in [header, *body]
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
