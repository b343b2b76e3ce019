"""The condition contract (:class:`Condition`), the step it is asked at, seeded draws, and the two constants.

See :mod:`lit_partial.conditions` for the forms conditions are written in.
"""

from __future__ import annotations

import functools
import zlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lit_partial.distributed import any_rank, is_sharded

__all__ = ["Always", "Condition", "Never", "StepCondition", "StepContext", "salt_hash", "uniform_draw"]


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

    def bind(
        self,
        ctx: StepContext,
        *,
        salt: str = "",
        per_sample: bool = False,
        rows: list[Tensor] | None = None,
        batch_size: int | None = None,
    ) -> Condition:
        """This condition with every part that does not read the activation decided at ``ctx``.

        What a callback does at the start of a training step, so its hooks only read the result: a decided part
        becomes ``Always()`` / ``Never()``; a per-sample draw (``per_sample`` with a known ``batch_size``) is made
        now, appended to ``rows`` and referred to by index; what needs the activation (a statistic) stays.
        """
        if self.needs_activation:
            return self
        return Always() if self(ctx, None, salt=salt) else Never()

    @property
    def constant(self) -> bool | None:
        """True / False for a condition that holds always / never (a bound, decided one), else None."""
        return None

    @property
    def is_decided(self) -> bool:
        """True when a bound condition needs no activation: decided parts and draws made before the step only."""
        return self.constant is not None

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
        """The condition per batch row: a bool ``(batch_size,)`` tensor (on ``device``).

        Draws and statistics differ per row; any other condition holds for the whole batch or not at all.
        ``rows`` are the draws :meth:`bind` made before the step.
        """
        return torch.full((batch_size,), bool(self(ctx, x, salt=salt)), dtype=torch.bool, device=device)

    def describe(self) -> str:
        """A short human description (for log lines)."""
        return repr(self)

    def to_spec(self) -> Any:
        """The plain-data form :func:`parse_condition` builds this condition from, every default filled in."""
        return repr(self)  # a condition defined outside lit_partial, without a plain form: its repr

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

    def agreed(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return bool(self(ctx, None, salt=salt))


@dataclass(frozen=True)
class Always(StepCondition):
    """Holds at every step."""

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return True

    @property
    def constant(self) -> bool | None:
        return True

    def to_spec(self) -> Any:
        return "always"


@dataclass(frozen=True)
class Never(StepCondition):
    """Holds at no step."""

    def __call__(self, ctx: StepContext, x: Tensor | None = None, *, salt: str = "") -> bool:
        return False

    @property
    def constant(self) -> bool | None:
        return False

    def to_spec(self) -> Any:
        return "never"
