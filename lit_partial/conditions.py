"""When-rules: small validated objects that say whether a rule holds at a training step.

Conditions are data, never code: each is built from a plain dict (or the strings ``"always"`` /
``"never"``) by :func:`parse_condition`, and no string is ever evaluated.

======================================================  ===============================================
form                                                    holds when
======================================================  ===============================================
``"always"`` / ``"never"``                              always / never
``{"epochs": [a, b]}``                                  ``a <= epoch < b`` (``b`` may be ``null``: open)
``{"steps": [a, b]}``                                   ``a <= global_step < b``
``{"every_n_steps": n, "offset": k}``                   ``global_step % n == k`` (``offset`` optional)
``{"probability": p, "seed": s}``                       a draw below ``p``, the same on every rank
``{"probability": p, "warmup_steps": n}``               a draw below ``p * min(1, global_step / n)``
``{"stat": s, "op": o, "value": v}``                    ``stat(activation) o v``, e.g. mean > 0
``{"metric": m, "op": o, "value": v}``                  the last logged value of ``m`` satisfies ``o v``
``{"plateau": m, "mode": "min", "patience": p}``        ``m`` has not improved for ``p`` evaluations
``{"all": [...]}`` / ``{"any": [...]}``                 every / some listed condition holds
======================================================  ===============================================

Probability draws are a pure function of ``(seed, salt, global_step, batch_idx)``: identical on every
rank and after resume, independent of global RNG state. ``salt`` distinguishes rules (callbacks pass
the rule's name).

Metric conditions read :attr:`StepContext.metrics`: the values of each metric at the evaluations so far
(callbacks record them as Lightning's ``EarlyStopping`` checks its monitor, the same on every rank, and save
them for resume). ``{"plateau": "val_loss", "mode": "min", "patience": 2, "min_delta": 0.0}`` holds while the
last ``patience`` evaluations brought no improvement over the best value before them (improvement: lower than
the best by more than ``min_delta`` for ``"min"``, higher for ``"max"``; NaN never improves).

Example:
    >>> cond = parse_condition({"epochs": [0, 3]})
    >>> cond(StepContext(epoch=2, global_step=40)), cond(StepContext(epoch=3, global_step=60))
    (True, False)
    >>> p = parse_condition({"probability": 0.5, "seed": 1})
    >>> p(StepContext(global_step=7), salt="head") == p(StepContext(global_step=7), salt="head")
    True
    >>> plateau = parse_condition({"plateau": "val_loss", "mode": "min", "patience": 2})
    >>> plateau(StepContext(metrics={"val_loss": (0.9, 0.5, 0.6, 0.55)}))
    True
"""

from __future__ import annotations

import functools
import math
import operator
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_partial._plain import to_plain
from lit_partial.distributed import any_rank, global_statistic, is_sharded
from lit_partial.errors import ConditionError

__all__ = [
    "COMPARISONS",
    "STATISTICS",
    "AllOf",
    "Always",
    "AnyOf",
    "Condition",
    "ConditionError",
    "EpochWindow",
    "EveryNSteps",
    "Metric",
    "Never",
    "Plateau",
    "Probability",
    "Statistic",
    "StepCondition",
    "StepContext",
    "StepWindow",
    "metric_names",
    "parse_condition",
    "plateau_wait",
    "salt_hash",
    "uniform_draw",
]

VALID_FORMS = (
    '"always", "never", {"epochs": [a, b]}, {"steps": [a, b]}, {"every_n_steps": n}, '
    '{"probability": p, "warmup_steps": n}, '
    '{"stat": "mean"|"max"|"min"|"norm"|"std"|"abs_mean", "op": ">"|">="|"<"|"<="|"=="|"!=", '
    '"value": v}, {"metric": name, "op": ..., "value": v}, {"plateau": name, "mode": "min"|"max", "patience": p, '
    '"min_delta": d}, {"all": [...]}, {"any": [...]}'
)


@dataclass(frozen=True)
class StepContext:
    """Where training is when a condition is asked.

    Attributes:
        epoch: The current epoch (``trainer.current_epoch``).
        global_step: Optimizer steps taken so far (``trainer.global_step``).
        batch_idx: The batch index within the epoch, so micro-batches of one optimizer step draw differently.
        training: False during validation, test and predict.
        sharded: True under a strategy that shards parameters (FSDP2): decisions that depend on per-rank data
            are then taken once for all ranks (:meth:`Condition.agreed`).
        metrics: For metric conditions: each metric's values at the evaluations so far, oldest first
            (None: no metric recorded).
    """

    epoch: int = 0
    global_step: int = 0
    batch_idx: int = 0
    training: bool = True
    sharded: bool = False
    metrics: Mapping[str, Sequence[float]] | None = None

    @classmethod
    def from_trainer(cls, trainer: Any, batch_idx: int = 0) -> StepContext:
        """Read the context off a Lightning ``Trainer``."""
        epoch, step, training = int(trainer.current_epoch), int(trainer.global_step), bool(trainer.training)
        return cls(epoch, step, int(batch_idx), training, is_sharded(trainer))


def _mix64(x: int) -> int:
    # splitmix64 finalizer: a counter-based hash, so each (seed, salt, step) gets an independent draw.
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=65536)
def salt_hash(salt: str) -> int:
    """``zlib.crc32`` of the salt, computed once per salt (rule and module names are few and fixed)."""
    return zlib.crc32(salt.encode())


def uniform_draw(seed: int, salt: str, *counters: int) -> float:
    """A deterministic uniform number in ``[0, 1)`` from a seed, a salt string and integer counters.

    Example:
        >>> uniform_draw(0, "blocks.3", 10) == uniform_draw(0, "blocks.3", 10)
        True
    """
    state = _mix64(seed & 0xFFFFFFFFFFFFFFFF ^ salt_hash(salt))
    for counter in counters:
        state = _mix64(state ^ (counter & 0xFFFFFFFFFFFFFFFF))
    return (state >> 11) / float(1 << 53)


class Condition(ABC):
    """A when-rule. Call it with a :class:`StepContext` (and, for statistics, the activation)."""

    #: True when the condition needs the activation tensor (statistic conditions).
    needs_activation: bool = False

    @abstractmethod
    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        """Whether the condition holds at ``ctx`` (``x`` is the activation, ``salt`` the rule name)."""

    def agreed(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        """Decide once for all ranks: every rank returns the same bool (a collective: call it on every rank).

        By default the condition holds when it holds on some rank (one all-reduce of the local decisions).
        Conditions of the step alone agree by construction and answer locally; a statistic is decided on
        :func:`~lit_partial.distributed.global_statistic` of the activation over all ranks; ``all`` / ``any``
        combine their parts, each already agreed, so every rank runs the same collectives in the same order.
        """
        local = bool(self(ctx, x if self.needs_activation else None, salt=salt))
        return any_rank(local, x.device if x is not None else None)

    @property
    def is_random(self) -> bool:
        """True when the decision uses a (seeded) draw."""
        return False

    @property
    def metrics(self) -> frozenset[str]:
        """Names of the logged metrics the condition reads (see :attr:`StepContext.metrics`)."""
        return frozenset()


class StepCondition(Condition):
    """A condition of the step alone (epoch, step, seeded draw): the same on every rank by construction."""

    def agreed(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return bool(self(ctx, None, salt=salt))


@dataclass(frozen=True)
class Always(StepCondition):
    """Holds at every step."""

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return True


@dataclass(frozen=True)
class Never(StepCondition):
    """Holds at no step."""

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return False


@dataclass(frozen=True)
class EpochWindow(StepCondition):
    """Holds while ``start <= epoch < end`` (``end=None``: open-ended)."""

    start: int
    end: int | None = None

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return self.start <= ctx.epoch and (self.end is None or ctx.epoch < self.end)


@dataclass(frozen=True)
class StepWindow(StepCondition):
    """Holds while ``start <= global_step < end`` (``end=None``: open-ended)."""

    start: int
    end: int | None = None

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return self.start <= ctx.global_step and (self.end is None or ctx.global_step < self.end)


@dataclass(frozen=True)
class EveryNSteps(StepCondition):
    """Holds when ``global_step % n == offset``."""

    n: int
    offset: int = 0

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return ctx.global_step % self.n == self.offset


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

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return uniform_draw(self.seed, salt, ctx.global_step, ctx.batch_idx) < self.rate(ctx)

    @property
    def is_random(self) -> bool:  # noqa: D102
        return True

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

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        if x is None:
            raise ConditionError(f"the statistic condition {self} needs the activation tensor, and none was given.")
        with torch.no_grad():
            return bool(COMPARISONS[self.op](STATISTICS[self.stat](x.detach().float(), None), self.value))

    def agreed(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        if x is None:
            return super().agreed(ctx, x, salt=salt)
        return bool(COMPARISONS[self.op](global_statistic(self.stat, x), self.value))

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

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return all(c(ctx, x, salt=salt) for c in self.conditions)

    def agreed(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return all(c.agreed(ctx, x, salt=salt) for c in self.conditions)

    @property
    def needs_activation(self) -> bool:  # type: ignore[override]  # a property over the base's class attribute  # noqa: D102
        return any(c.needs_activation for c in self.conditions)

    @property
    def is_random(self) -> bool:  # noqa: D102
        return any(c.is_random for c in self.conditions)

    @property
    def metrics(self) -> frozenset[str]:  # noqa: D102
        return frozenset().union(*(c.metrics for c in self.conditions))


@dataclass(frozen=True)
class AnyOf(AllOf):
    """Holds when some listed condition holds."""

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return any(c(ctx, x, salt=salt) for c in self.conditions)

    def agreed(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        return any(c.agreed(ctx, x, salt=salt) for c in self.conditions)


def _history(ctx: StepContext, name: str) -> Sequence[float]:
    return ctx.metrics.get(name, ()) if ctx.metrics is not None else ()


@dataclass(frozen=True)
class Metric(Condition):
    """Holds when the last recorded value of metric ``name`` satisfies ``value op threshold`` (never before one)."""

    name: str
    op: str
    value: float

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        history = _history(ctx, self.name)
        return bool(history) and bool(COMPARISONS[self.op](history[-1], self.value))

    @property
    def metrics(self) -> frozenset[str]:  # noqa: D102
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

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:  # noqa: D102
        history = _history(ctx, self.name)
        return bool(history) and plateau_wait(history, self.mode, self.min_delta) >= self.patience

    @property
    def metrics(self) -> frozenset[str]:  # noqa: D102
        return frozenset({self.name})


def metric_names(condition: Condition) -> frozenset[str]:
    """The logged metrics ``condition`` reads (empty for conditions of the step, draws and statistics)."""
    return condition.metrics


def _int(spec: Mapping[str, Any], key: str, value: Any, *, minimum: int = 0, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConditionError(f"condition {dict(spec)!r}: `{key}` must be an integer >= {minimum}, got {value!r}.")
    return value


def _window(spec: Mapping[str, Any], key: str) -> tuple[int, int | None]:
    value = spec[key]
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 2:
        raise ConditionError(f"condition {dict(spec)!r}: `{key}` must be a pair [start, end] (end may be null).")
    start = _int(spec, f"{key}[0]", value[0])
    end = _int(spec, f"{key}[1]", value[1], allow_none=True)
    if end is not None and end <= start:  # type: ignore[operator]  # _int: None only if allow_none
        raise ConditionError(f"condition {dict(spec)!r}: `{key}` end {end} must be greater than start {start}.")
    return start, end  # type: ignore[return-value]  # start: _int without allow_none


def _probability(spec: Mapping[str, Any]) -> Probability:
    p = spec["probability"]
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= float(p) <= 1.0:
        raise ConditionError(f"condition {dict(spec)!r}: `probability` must be a number in [0, 1], got {p!r}.")
    seed = _int(spec, "seed", spec.get("seed", 0))
    warmup = _int(spec, "warmup_steps", spec.get("warmup_steps", 0))
    return Probability(float(p), seed, warmup)  # type: ignore[arg-type]  # _int returns None only with allow_none


def _statistic(spec: Mapping[str, Any]) -> Statistic:
    stat, op, value = spec.get("stat"), spec.get("op"), spec.get("value")
    if stat not in STATISTICS:
        raise ConditionError(f"condition {dict(spec)!r}: `stat` must be one of {sorted(STATISTICS)}, got {stat!r}.")
    if op not in COMPARISONS:
        raise ConditionError(f"condition {dict(spec)!r}: `op` must be one of {list(COMPARISONS)}, got {op!r}.")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConditionError(f"condition {dict(spec)!r}: `value` must be a finite number, got {value!r}.")
    return Statistic(stat, op, float(value))


def _metric_name(spec: Mapping[str, Any], key: str) -> str:
    name = spec.get(key)
    if not isinstance(name, str) or not name.strip():
        raise ConditionError(
            f"condition {dict(spec)!r}: `{key}` must name a logged metric (a non-empty string such as 'val_loss'), "
            f"got {name!r}."
        )
    return name


def _metric(spec: Mapping[str, Any]) -> Metric:
    op, value = spec.get("op"), spec.get("value")
    if op not in COMPARISONS:
        raise ConditionError(f"condition {dict(spec)!r}: `op` must be one of {list(COMPARISONS)}, got {op!r}.")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConditionError(f"condition {dict(spec)!r}: `value` must be a finite number, got {value!r}.")
    return Metric(_metric_name(spec, "metric"), op, float(value))


def _plateau(spec: Mapping[str, Any]) -> Plateau:
    mode = spec.get("mode", "min")
    if mode not in ("min", "max"):
        raise ConditionError(
            f"condition {dict(spec)!r}: `mode` must be 'min' (lower is better, e.g. a loss) or 'max' (e.g. accuracy), "
            f"got {mode!r}."
        )
    patience = _int(spec, "patience", spec.get("patience", 1), minimum=1)
    min_delta = spec.get("min_delta", 0.0)
    if isinstance(min_delta, bool) or not isinstance(min_delta, int | float) or not 0.0 <= min_delta < math.inf:
        raise ConditionError(
            f"condition {dict(spec)!r}: `min_delta` must be a finite number >= 0 (the smallest change that counts as "
            f"an improvement), got {min_delta!r}."
        )
    return Plateau(_metric_name(spec, "plateau"), mode, patience or 1, float(min_delta))


_FORMS: dict[str, tuple[set[str], Callable[[Mapping[str, Any]], Condition]]] = {
    "epochs": ({"epochs"}, lambda s: EpochWindow(*_window(s, "epochs"))),
    "steps": ({"steps"}, lambda s: StepWindow(*_window(s, "steps"))),
    "every_n_steps": (
        {"every_n_steps", "offset"},
        lambda s: EveryNSteps(
            _int(s, "every_n_steps", s["every_n_steps"], minimum=1) or 1, _int(s, "offset", s.get("offset", 0)) or 0
        ),
    ),
    "probability": ({"probability", "seed", "warmup_steps"}, _probability),
    "stat": ({"stat", "op", "value"}, _statistic),
    "metric": ({"metric", "op", "value"}, _metric),
    "plateau": ({"plateau", "mode", "patience", "min_delta"}, _plateau),
    "all": ({"all"}, lambda s: AllOf(_sub_conditions(s, "all"))),
    "any": ({"any"}, lambda s: AnyOf(_sub_conditions(s, "any"))),
}


def _sub_conditions(spec: Mapping[str, Any], key: str) -> tuple[Condition, ...]:
    items = spec[key]
    if isinstance(items, str) or not isinstance(items, Sequence) or not items:
        raise ConditionError(f"condition {dict(spec)!r}: `{key}` must be a non-empty list of conditions.")
    return tuple(parse_condition(item) for item in items)


def parse_condition(spec: Any) -> Condition:
    """Build a :class:`Condition` from its plain-data form (see the module docstring for the forms).

    Args:
        spec: ``"always"``, ``"never"``, a dict in one of the valid forms, or a ``Condition`` (returned as is).
            OmegaConf containers are accepted.

    Raises:
        ConditionError: If ``spec`` is not one of the valid forms; the message lists them.
    """
    if isinstance(spec, Condition):
        return spec
    # Compare by type, not ==: 1 == 1.0 == True, so `spec in ("always", True)` would read 1.0 as "always".
    if spec is True or (isinstance(spec, str) and spec == "always"):
        return Always()
    if spec is False or (isinstance(spec, str) and spec == "never"):
        return Never()
    if isinstance(spec, int | float):
        raise ConditionError(
            f'invalid condition {spec!r}: a bare number is not a condition; write true/"always" or false/"never", '
            f'or e.g. {{"probability": {spec}}} for a random draw. Valid forms: {VALID_FORMS}.'
        )
    spec = to_plain(spec)
    if isinstance(spec, Mapping):
        for key, (allowed, build) in _FORMS.items():
            if key in spec:
                extra = set(spec) - allowed
                if extra:
                    raise ConditionError(
                        f"condition {spec!r}: unexpected key(s) {sorted(extra)} for the {key!r} form "
                        f"(allowed: {sorted(allowed)}). Valid forms: {VALID_FORMS}."
                    )
                return build(spec)
    raise ConditionError(f"invalid condition {spec!r}. Valid forms: {VALID_FORMS}.")
