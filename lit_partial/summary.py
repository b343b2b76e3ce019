"""What takes part in backprop: parameter counts per module, at a chosen depth, for plain and wrapped models.

Rows group parameters by module. ``depth`` counts only levels where a model branches: a module whose
parameters all sit in one child (a LightningModule holding ``self.model``, PEFT's ``PeftModel`` /
``LoraModel``, ``torch.compile``'s ``_orig_mod``, LoRA's ``lora_A.default``) is looked through, so
``depth=1`` shows the first level with several parts, and every row name is a selector that names it. A
tied parameter (one tensor under several names, e.g. GPT-2's ``lm_head.weight`` and
``transformer.wte.weight``) counts once, in the row of its first name; :func:`tie_notes` says so.

Example:
    >>> import torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    >>> model[0].requires_grad_(False)  # doctest: +ELLIPSIS
    Linear(...)
    >>> [(r.name, r.total, r.trainable) for r in summarize(model)]
    [('0', 6, 0), ('1', 3, 3), ('total', 9, 3)]
    >>> wrapped = nn.ModuleDict({"model": nn.ModuleDict({"inner": model})})  # wrappers with one child each
    >>> [r.name for r in summarize(wrapped)]
    ['model.inner.0', 'model.inner.1', 'total']
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lit_partial.errors import ConfigurationError
from lit_partial.selectors import tied_parameter_names

__all__ = ["SummaryRow", "format_summary", "record_masked", "summarize", "tie_notes"]

# model -> {parameter name: masked elements}; kept beside the model (not in it) so it outlives teardown
_masked: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = weakref.WeakKeyDictionary()


def record_masked(model: nn.Module, counts: dict[str, int]) -> None:
    """Tell :func:`summarize` how many elements of each named parameter of ``model`` are masked (frozen)."""
    _masked.setdefault(model, {}).update(counts)


@dataclass(frozen=True)
class SummaryRow:
    """Parameter counts of one module (or the ``total`` row)."""

    name: str
    total: int
    trainable: int
    masked: int


class _Tree:
    """The dotted parameter names as a tree: which components follow each prefix."""

    def __init__(self, names: Sequence[str]) -> None:
        self.params = set(names)
        self.children: dict[str, list[str]] = {}
        for name in names:
            parts = name.split(".")
            for k in range(len(parts)):
                kids = self.children.setdefault(".".join(parts[:k]), [])
                if parts[k] not in kids:
                    kids.append(parts[k])

    def group(self, name: str, depth: int) -> str:
        """The row ``name`` belongs to: its module ``depth`` branching levels down (or itself, if it is a row)."""
        parts = name.split(".")
        size, level = 0, 0
        while size < len(parts):
            prefix = ".".join(parts[:size])
            kids = self.children[prefix]
            own = [k for k in kids if _join(prefix, k) in self.params]
            if prefix and len(own) == len(kids):  # a module holding parameters only: one row
                return prefix
            if len(kids) == 1 and not own:  # a wrapper: its one child holds everything, look through it
                size += 1
                continue
            if level == depth:
                return prefix
            size, level = size + 1, level + 1
        return name  # a parameter of a module that also has submodules: its own row


def _join(prefix: str, part: str) -> str:
    return f"{prefix}.{part}" if prefix else part


def _check_depth(depth: int) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigurationError(f"summary `depth` must be a positive int (branching levels shown), got {depth!r}.")


def summarize(model: nn.Module, depth: int = 1) -> list[SummaryRow]:
    """Count parameters per module: total, trainable (``requires_grad``) and masked elements, then a total row.

    Masked counts come from callbacks that mask elements (``GradientMasking``); trainable counts include
    masked elements of trainable parameters. Shared (tied) parameters count once, at their first name.

    Args:
        model: Any module (a LightningModule, a Hugging Face or PEFT model, ...).
        depth: Branching levels to descend (modules with a single child are looked through, not counted).

    Raises:
        ValueError: If ``depth`` is not a positive int.
    """
    _check_depth(depth)
    masked = _masked.get(model, {})
    params = list(model.named_parameters())
    tree = _Tree([name for name, _ in params])
    counts: dict[str, list[int]] = {}
    for name, param in params:
        row = counts.setdefault(tree.group(name, depth), [0, 0, 0])
        row[0] += param.numel()
        row[1] += param.numel() if param.requires_grad else 0
        row[2] += masked.get(name, 0)
    rows = [SummaryRow(name, *values) for name, values in counts.items()]
    rows.append(SummaryRow("total", *(sum(col) for col in zip(*counts.values(), strict=True)) if counts else (0, 0, 0)))
    return rows


def tie_notes(model: nn.Module, depth: int = 1) -> list[str]:
    """One line per tied parameter: its names, and the row of :func:`summarize` that counts it.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.ModuleDict({"embed": nn.Embedding(4, 2), "head": nn.Linear(2, 4, bias=False)})
        >>> model.head.weight = model.embed.weight
        >>> tie_notes(model)
        ['tied: embed.weight = head.weight (one tensor of 8 elements, counted once, in row embed)']
    """
    _check_depth(depth)
    tree = _Tree([n for n, _ in model.named_parameters()])
    params = dict(model.named_parameters())
    return [
        f"tied: {' = '.join(names)} (one tensor of {params[names[0]].numel():,} elements, counted once, in row "
        f"{tree.group(names[0], depth)})"
        for names in tied_parameter_names(model)
    ]


def format_summary(rows: list[SummaryRow], notes: Sequence[str] = ()) -> str:
    """Render :func:`summarize` rows as a fixed-width text table, with ``notes`` (e.g. :func:`tie_notes`) below."""
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
    return "\n".join([*lines, *notes])
