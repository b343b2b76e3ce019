"""An independent reference for rule decisions: each rule decided on the activation, in the hook, by type.

What the library once did before it decided rules at the start of the step (``Target``) and before conditions
carried their own behaviour (``Condition.bind`` / ``per_row`` / ``agreed``). ``tests/callbacks/test_decisions.py``
checks that ``Target`` decides exactly as this does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_partial.callbacks._rules import Rule
from lit_partial.conditions import AllOf, AnyOf, Condition, ConditionError, Probability, Statistic, StepContext
from lit_partial.distributed import holds_on_all_ranks

__all__ = ["reference_decide", "reference_sample_mask"]


def reference_sample_mask(cond: Condition, ctx: StepContext, x: Tensor, salt: str) -> Tensor:
    """Evaluate ``cond`` per batch row of ``x``: a bool ``(B,)`` tensor on ``x``'s device.

    Statistics and probabilities are per row; step/epoch windows hold for the whole batch.
    """
    batch = x.shape[0]
    if isinstance(cond, Statistic):
        return cond.per_sample(x)
    if isinstance(cond, Probability):
        return cond.per_sample(ctx, batch, salt=salt, device=x.device)
    if isinstance(cond, AnyOf):  # before AllOf: AnyOf subclasses it
        masks = [reference_sample_mask(c, ctx, x, salt) for c in cond.conditions]
        return torch.stack(masks).any(0)
    if isinstance(cond, AllOf):
        masks = [reference_sample_mask(c, ctx, x, salt) for c in cond.conditions]
        return torch.stack(masks).all(0)
    return torch.full((batch,), bool(cond(ctx, x, salt=salt)), dtype=torch.bool, device=x.device)


def reference_decide(rule: Rule, ctx: StepContext, x: Tensor | None, salt: str) -> bool | Tensor:
    """Whether ``rule`` holds now: a bool, or a ``(B,)`` bool tensor for per-sample rules.

    Under a sharded strategy (``ctx.sharded``, FSDP2) a whole-batch decision is the same on every rank (a
    statistic is computed over all ranks' activations); per-sample decisions stay per rank, since they never
    change which parameters get gradients.

    Raises:
        ConditionError: If the rule needs an activation and ``x`` holds no floating-point tensor.
    """
    if x is None and (rule.per_sample or rule.condition.needs_activation):
        raise ConditionError(
            f"rule {rule.key!r} on {salt!r} needs a floating-point tensor (a statistic or per-sample rule), but the "
            "module's output holds none; rule on a module that returns a float tensor, tuple or dict of them."
        )
    if rule.per_sample:
        if x.dim() == 0:  # type: ignore[union-attr]  # None raised above
            raise ConditionError(f"per-sample rule {rule.key!r} on {salt!r} got a 0-d tensor; it needs a batch dim.")
        return reference_sample_mask(rule.condition, ctx, x, salt)  # type: ignore[arg-type]  # None raised above
    if ctx.sharded:  # FSDP2: ranks deciding differently would issue different collectives and hang
        return holds_on_all_ranks(rule.condition, ctx, x, salt)
    return bool(rule.condition(ctx, x if rule.condition.needs_activation else None, salt=salt))
