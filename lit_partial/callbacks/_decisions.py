"""Decisions made at the start of each training step: :class:`RuleTarget`, what hooks read.

Hooks run inside the model's forward, i.e. inside a compiled region when the model is compiled. Anything a hook
reads that changes every step (the step number, a draw, a counter) would make Dynamo recompile every step, and
zlib.crc32 or Tensor.item() would break the graph. So every rule is decided in on_train_batch_start, in plain
Python, for every target (module or gate) it acts on; the hook reads only `RuleTarget.decision`: None (not in a
training step), a bool, or a (B,) bool tensor. Dynamo guards a bool by value and a tensor by its metadata, so a
compiled model gets one graph per distinct pattern of decisions. What a rule can only decide on the activation
(statistics) is left as a bound condition whose other leaves are already decided, and evaluated in the hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from lit_partial.callbacks._rule_spec import Rule
from lit_partial.conditions import Condition, ConditionError, Never, StepContext
from lit_partial.tree import first_tensor

__all__ = ["DECIDE_IN_HOOK", "EVALUATE", "RuleTarget", "Target", "batch_size_of"]

DECIDE_IN_HOOK = "evaluate"  # RuleTarget.decision when the hook must evaluate `RuleTarget.bound` on the activation
EVALUATE = DECIDE_IN_HOOK  # its former name
_NEVER = Never()
_NO_CONTEXT = StepContext()  # what a bound condition is called with: its step-dependent leaves are decided already


@dataclass(eq=False)
class RuleTarget:
    """One module or gate a rule acts on, and the rule's decision for the current training step.

    Attributes:
        rule: The rule.
        name: The module or gate name (the salt of the rule's draws).
        decision: None outside training steps; a bool, or a ``(B,)`` bool CPU tensor for per-sample rules, when
            decided before the step; :data:`DECIDE_IN_HOOK` when the hook evaluates :attr:`bound` on the activation.
        bound: The rule's condition with every leaf but activation statistics decided for this step.
        rows: Per-sample draws of this step that :attr:`bound` refers to.
        ctx: This step's context (only for per-sample draws whose batch size is known only in forward, and for
            statistics decided over all ranks).
        sharded: Whether this step runs under a sharded strategy (FSDP2): whole-batch statistics are then decided
            over all ranks (:meth:`~lit_partial.conditions.Condition.agreed`).
        observed: Where the hook puts the decisions it makes itself, for counting after the step.
    """

    rule: Rule
    name: str
    decision: bool | Tensor | str | None = None
    bound: Condition = _NEVER
    rows: list[Tensor] = field(default_factory=list)
    ctx: StepContext = _NO_CONTEXT
    sharded: bool = False
    observed: list[tuple[str, bool | Tensor]] = field(default_factory=list)
    _interned: dict[Condition, Condition] = field(default_factory=dict)

    def begin(self, ctx: StepContext, batch_size: int | None) -> tuple[float, float] | None:
        """Decide the rule for this step; returns ``(hits, total)`` when decided, None when left to the hook."""
        rule, rows = self.rule, list[Tensor]()
        bound = rule.condition.bind(ctx, salt=self.name, per_sample=rule.per_sample, rows=rows, batch_size=batch_size)
        # The same object for the same pattern: Dynamo guards objects by identity.
        self.bound = self._interned.setdefault(bound, bound)
        self.rows, self.ctx, self.sharded = rows, ctx, ctx.sharded
        if not rule.per_sample and bound.constant is not None:
            self.decision = bound.constant
            return float(self.decision), 1.0
        if rule.per_sample and batch_size is not None and bound.is_decided:
            mask = bound.per_row(ctx, None, batch_size, salt=self.name, rows=rows)
            self.decision = mask
            return float(mask.sum()), float(mask.numel())
        self.decision = DECIDE_IN_HOOK
        return None

    def end(self) -> None:
        """Leave the training step: the hook passes everything through again."""
        self.decision, self.rows, self.ctx = None, [], _NO_CONTEXT

    def resolve(self, output: Any) -> bool | Tensor | None:
        """The decision on ``output`` (the module's output, or its input for skips); None outside training steps."""
        decision = self.decision
        if decision is None or isinstance(decision, bool):
            return decision
        x = first_tensor(output)
        if isinstance(decision, Tensor):  # rows drawn at the loader's batch size: redrawn if the module's differs
            if x is not None and x.dim() > 0 and x.shape[0] != decision.shape[0]:  # static shapes: free when compiled
                return self.bound.per_row(self.ctx, x, x.shape[0], salt=self.name, rows=self.rows, device=x.device)
            return decision
        rule = self.rule
        if x is None:
            raise ConditionError(
                f"rule {rule.key!r} on {self.name!r} needs a floating-point tensor (a statistic or per-sample rule), "
                "but the module's output holds none; rule on a module that returns a float tensor, tuple or dict of "
                "them."
            )
        if rule.per_sample:
            if x.dim() == 0:
                raise ConditionError(
                    f"per-sample rule {rule.key!r} on {self.name!r} got a 0-d tensor; it needs a batch dim."
                )
            made: bool | Tensor = self.bound.per_row(
                self.ctx, x, x.shape[0], salt=self.name, rows=self.rows, device=x.device
            )
        elif self.sharded:  # FSDP2: the statistic over all ranks, so every rank runs the same collectives
            made = self.bound.agreed(self.ctx, x, salt=self.name)
        else:
            made = bool(self.bound(_NO_CONTEXT, x, salt=self.name))  # a statistic: the data choose the graph
        self.observed.append((rule.key, made))
        return made


Target = RuleTarget  # its former name


def batch_size_of(batch: Any) -> int | None:
    """The first dimension of the first tensor of ``batch`` (None if it holds no tensor with a dimension)."""
    t = first_tensor(batch, floating=False)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else None
