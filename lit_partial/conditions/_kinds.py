"""The condition kinds: windows, every-n, seeded draws, activation statistics, metrics, plateaus, all / any.

Each kind is one class that knows how to decide (``__call__``), bind before a step (:meth:`Condition.bind`), decide
per batch row (:meth:`Condition.per_row`), agree across ranks (:meth:`Condition.agreed`) and describe itself
(:meth:`Condition.describe`, :meth:`Condition.to_spec`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from lit_partial.conditions._base import Always, Condition, Never, StepCondition, StepContext, uniform_draw
from lit_partial.distributed import global_statistic
from lit_partial.errors import ConditionError

__all__ = [
    "COMPARISONS",
    "STATISTICS",
    "AllOf",
    "AnyOf",
    "EpochWindow",
    "EveryNSteps",
    "Metric",
    "Plateau",
    "Probability",
    "Statistic",
    "StepWindow",
    "metric_names",
    "plateau_wait",
]


@dataclass(frozen=True)
class EpochWindow(StepCondition):
    """Holds while ``start <= epoch < end`` (``end=None``: open-ended)."""

    start: int
    end: int | None = None

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return self.start <= ctx.epoch and (self.end is None or ctx.epoch < self.end)

    def to_spec(self) -> Any:
        return {"epochs": [self.start, self.end]}


@dataclass(frozen=True)
class StepWindow(StepCondition):
    """Holds while ``start <= global_step < end`` (``end=None``: open-ended)."""

    start: int
    end: int | None = None

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return self.start <= ctx.global_step and (self.end is None or ctx.global_step < self.end)

    def to_spec(self) -> Any:
        return {"steps": [self.start, self.end]}


@dataclass(frozen=True)
class EveryNSteps(StepCondition):
    """Holds when ``global_step % n == offset``."""

    n: int
    offset: int = 0

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return ctx.global_step % self.n == self.offset

    def to_spec(self) -> Any:
        return {"every_n_steps": self.n, "offset": self.offset}


@dataclass(frozen=True, repr=False)
class Probability(StepCondition):
    """Holds with probability ``p``; the draw depends only on ``(seed, salt, global_step, batch_idx)``.

    With ``warmup_steps = n > 0`` the probability ramps linearly from 0 at step 0 to ``p`` at step ``n``
    (composer's ``drop_warmup``): :meth:`rate` is ``p * min(1, global_step / n)``, a function of the step alone,
    so it is the same on every rank and after a resume.

    Example:
        >>> [Probability(0.5, warmup_steps=4).rate(StepContext(global_step=s)) for s in (0, 1, 4, 9)]
        [0.0, 0.125, 0.5, 0.5]
    """

    p: float
    seed: int = 0
    warmup_steps: int = 0

    def __repr__(self) -> str:
        # Without warmup_steps when 0: configurations (and checkpoints) from before the field read the same.
        warmup = f", warmup_steps={self.warmup_steps}" if self.warmup_steps else ""
        return f"Probability(p={self.p!r}, seed={self.seed!r}{warmup})"

    def rate(self, ctx: StepContext) -> float:
        """The probability at ``ctx``: ``p``, ramped up over the first ``warmup_steps`` optimizer steps."""
        if self.warmup_steps <= 0 or ctx.global_step >= self.warmup_steps:
            return self.p
        return self.p * ctx.global_step / self.warmup_steps

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return uniform_draw(self.seed, salt, ctx.global_step, ctx.batch_idx) < self.rate(ctx)

    @property
    def is_random(self) -> bool:
        return True

    def to_spec(self) -> Any:
        return {"probability": self.p, "seed": self.seed, "warmup_steps": self.warmup_steps}

    def bind(
        self,
        ctx: StepContext,
        *,
        salt: str = "",
        per_sample: bool = False,
        rows: list[Tensor] | None = None,
        batch_size: int | None = None,
    ) -> Condition:
        if not per_sample:
            return super().bind(ctx, salt=salt)
        if batch_size is None or rows is None:
            return self  # drawn in the hook, at the activation's batch size
        rows.append(self.per_sample(ctx, batch_size, salt=salt))
        return _RowDraw(len(rows) - 1, self)

    def per_row(
        self,
        ctx: StepContext,
        x: Tensor | None,
        batch_size: int,
        *,
        salt: str = "",
        rows: Sequence[Tensor] = (),
        device: Any = None,
    ) -> Tensor:
        return self.per_sample(ctx, batch_size, salt=salt, device=device)

    def per_sample(self, ctx: StepContext, batch_size: int, *, salt: str = "", device: Any = None) -> Tensor:
        """One draw per sample, shape ``(batch_size,)``, as reproducible as the scalar draw."""
        gen = torch.Generator().manual_seed(int(uniform_draw(self.seed, salt, ctx.global_step, ctx.batch_idx) * 2**53))
        return (torch.rand(batch_size, generator=gen) < self.rate(ctx)).to(device)


def _norm(x: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    return torch.linalg.vector_norm(x, dim=dims)  # type: ignore[no-any-return]  # torch stubs return Any


STATISTICS: dict[str, Callable[[Tensor, tuple[int, ...] | None], Tensor]] = {
    "mean": lambda x, d: x.mean(dim=d) if d else x.mean(),
    "abs_mean": lambda x, d: x.abs().mean(dim=d) if d else x.abs().mean(),
    "max": lambda x, d: x.amax(dim=d) if d else x.max(),
    "min": lambda x, d: x.amin(dim=d) if d else x.min(),
    "std": lambda x, d: x.std(dim=d) if d else x.std(),
    "norm": _norm,
}
COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass(frozen=True)
class Statistic(Condition):
    """Holds when ``stat(x) op value`` for the module's activation ``x`` (computed without gradient)."""

    stat: str
    op: str
    value: float
    needs_activation = True

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        if x is None:
            raise ConditionError(f"the statistic condition {self} needs the activation tensor, and none was given.")
        with torch.no_grad():
            return bool(COMPARISONS[self.op](STATISTICS[self.stat](x.detach().float(), None), self.value))

    def agreed(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        if x is None:
            return super().agreed(ctx, x, salt=salt)
        return bool(COMPARISONS[self.op](global_statistic(self.stat, x), self.value))

    def to_spec(self) -> Any:
        return {"stat": self.stat, "op": self.op, "value": self.value}

    def per_row(
        self,
        ctx: StepContext,
        x: Tensor | None,
        batch_size: int,
        *,
        salt: str = "",
        rows: Sequence[Tensor] = (),
        device: Any = None,
    ) -> Tensor:
        if x is None:
            raise ConditionError(f"the statistic condition {self} needs the activation tensor, and none was given.")
        return self.per_sample(x)

    def per_sample(self, x: Tensor) -> Tensor:
        """The condition per batch row: a bool tensor of shape ``(x.shape[0],)``."""
        with torch.no_grad():
            dims = tuple(range(1, x.dim())) or None
            values = STATISTICS[self.stat](x.detach().float(), dims) if dims else x.detach().float()
            return COMPARISONS[self.op](values, self.value)  # type: ignore[no-any-return]  # operator.* is untyped


@dataclass(frozen=True)
class AllOf(Condition):
    """Holds when every listed condition holds."""

    conditions: tuple[Condition, ...]
    _empty_holds: ClassVar[bool] = True  # all([]): what an empty list of parts gives

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return all(c(ctx, x, salt=salt) for c in self.conditions)

    def agreed(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return all(c.agreed(ctx, x, salt=salt) for c in self.conditions)

    def _combine(self, values: Tensor) -> Tensor:
        """Row masks of the parts, stacked, combined into one."""
        return values.all(0)

    def to_spec(self) -> Any:
        return {"all": [c.to_spec() for c in self.conditions]}

    def describe(self) -> str:
        return " and ".join(f"({c.describe()})" for c in self.conditions)

    def bind(
        self,
        ctx: StepContext,
        *,
        salt: str = "",
        per_sample: bool = False,
        rows: list[Tensor] | None = None,
        batch_size: int | None = None,
    ) -> Condition:
        # A part that decides the whole (Never for all, Always for any), and one that changes nothing.
        absorbing, neutral = (Never(), Always()) if self._empty_holds else (Always(), Never())
        parts = [
            c.bind(ctx, salt=salt, per_sample=per_sample, rows=rows, batch_size=batch_size) for c in self.conditions
        ]
        if any(p == absorbing for p in parts):
            return absorbing
        kept = tuple(p for p in parts if p != neutral)
        return neutral if not kept else kept[0] if len(kept) == 1 else type(self)(kept)

    @property
    def is_decided(self) -> bool:
        return all(c.is_decided for c in self.conditions)

    def per_row(
        self,
        ctx: StepContext,
        x: Tensor | None,
        batch_size: int,
        *,
        salt: str = "",
        rows: Sequence[Tensor] = (),
        device: Any = None,
    ) -> Tensor:
        masks = [c.per_row(ctx, x, batch_size, salt=salt, rows=rows, device=device) for c in self.conditions]
        return self._combine(torch.stack(masks))

    @property
    def needs_activation(self) -> bool:  # type: ignore[override]  # a property over the base's class attribute
        return any(c.needs_activation for c in self.conditions)

    @property
    def is_random(self) -> bool:
        return any(c.is_random for c in self.conditions)

    @property
    def metrics(self) -> frozenset[str]:
        return frozenset().union(*(c.metrics for c in self.conditions))


@dataclass(frozen=True)
class AnyOf(AllOf):
    """Holds when some listed condition holds."""

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return any(c(ctx, x, salt=salt) for c in self.conditions)

    def agreed(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return any(c.agreed(ctx, x, salt=salt) for c in self.conditions)

    _empty_holds: ClassVar[bool] = False  # any([])

    def _combine(self, values: Tensor) -> Tensor:
        return values.any(0)

    def to_spec(self) -> Any:
        return {"any": [c.to_spec() for c in self.conditions]}

    def describe(self) -> str:
        return " or ".join(f"({c.describe()})" for c in self.conditions)


def _history(ctx: StepContext, name: str) -> Sequence[float]:
    return ctx.metrics.get(name, ()) if ctx.metrics is not None else ()


@dataclass(frozen=True)
class Metric(Condition):
    """Holds when the last recorded value of metric ``name`` satisfies ``value op threshold`` (never before one)."""

    name: str
    op: str
    value: float

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        history = _history(ctx, self.name)
        return bool(history) and bool(COMPARISONS[self.op](history[-1], self.value))

    def to_spec(self) -> Any:
        return {"metric": self.name, "op": self.op, "value": self.value}

    def describe(self) -> str:
        return f"{self.name} {self.op} {self.value:g}"

    @property
    def metrics(self) -> frozenset[str]:
        return frozenset({self.name})


def plateau_wait(history: Sequence[float], mode: str = "min", min_delta: float = 0.0) -> int:
    """Evaluations since the last improvement of ``history`` (0 when the last value improved or is the first).

    Example:
        >>> plateau_wait([1.0, 0.8, 0.81, 0.8]), plateau_wait([1.0, 0.8, 0.7]), plateau_wait([0.5, 0.6], "max")
        (2, 0, 0)
    """
    best, wait = math.nan, 0
    for value in history:
        improved = math.isnan(best) and not math.isnan(value)
        if not improved and not math.isnan(value):
            improved = value < best - min_delta if mode == "min" else value > best + min_delta
        best, wait = (value, 0) if improved else (best, wait + 1)
    return wait


@dataclass(frozen=True)
class Plateau(Condition):
    """Holds while the last ``patience`` evaluations of metric ``name`` brought no improvement (see the module doc)."""

    name: str
    mode: str = "min"
    patience: int = 1
    min_delta: float = 0.0

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        history = _history(ctx, self.name)
        return bool(history) and plateau_wait(history, self.mode, self.min_delta) >= self.patience

    def to_spec(self) -> Any:
        return {"plateau": self.name, "mode": self.mode, "patience": self.patience, "min_delta": self.min_delta}

    def describe(self) -> str:
        delta = f", min_delta {self.min_delta:g}" if self.min_delta else ""
        return f"{self.name} plateaus ({self.mode}, patience {self.patience}{delta})"

    @property
    def metrics(self) -> frozenset[str]:
        return frozenset({self.name})


@dataclass(frozen=True)
class _RowDraw(Condition):
    """A per-sample draw of ``source`` made by :meth:`Probability.bind` before the step: row mask ``rows[index]``."""

    index: int
    source: Probability

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        raise ConditionError("a per-sample draw has no whole-batch value")  # pragma: no cover - never bound so

    @property
    def is_decided(self) -> bool:
        return True

    def per_row(
        self,
        ctx: StepContext,
        x: Tensor | None,
        batch_size: int,
        *,
        salt: str = "",
        rows: Sequence[Tensor] = (),
        device: Any = None,
    ) -> Tensor:
        mask = rows[self.index]
        if mask.shape[0] != batch_size:  # the module's batch differs from the loader's: draw at its size
            mask = self.source.per_sample(ctx, batch_size, salt=salt)
        return mask.to(device) if device is not None else mask

    def to_spec(self) -> Any:
        return self.source.to_spec()


def metric_names(condition: Condition) -> frozenset[str]:
    """The logged metrics ``condition`` reads (empty for conditions of the step, draws and statistics)."""
    return condition.metrics
