"""Shared machinery of ConditionalDetach and ConditionalSkip.

Rule parsing, target resolution, the step context, per-rule counters and logging, and making DDP accept a
graph that changes from step to step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lit_partial._plain import to_plain
from lit_partial.attach import watch_gates
from lit_partial.callbacks.base import Technique
from lit_partial.conditions import (
    AllOf,
    AnyOf,
    Condition,
    ConditionError,
    Never,
    Probability,
    Statistic,
    StepContext,
    parse_condition,
)
from lit_partial.distributed import allow_unused_parameters, holds_on_all_ranks
from lit_partial.errors import ConfigurationError
from lit_partial.functional.gradients import detach_if, scale_grad
from lit_partial.module import PartialBackpropMixin
from lit_partial.selection import SelectorError, as_selector_list, select_modules
from lit_partial.tree import first_tensor

GATE_PREFIX = "gate:"
_RULE_KEYS = {"when", "grad_scale", "per_sample"}


@dataclass(frozen=True)
class Rule:
    """One parsed rule: its key as written, when it holds, how much gradient passes, and per-sample or not."""

    key: str
    condition: Condition
    grad_scale: float = 0.0
    per_sample: bool = False

    @property
    def cuts_graph(self) -> bool:
        """True when the rule can leave upstream parameters without any gradient on some step."""
        return not self.per_sample and self.grad_scale == 0.0 and not isinstance(self.condition, Never)


def parse_rules(rules: Any, *, who: str, allow_grad_scale: bool) -> dict[str, Rule]:
    """Validate ``{key: condition | {"when": condition, "grad_scale": g, "per_sample": bool}}``.

    Raises:
        ConfigurationError: For a non-mapping or empty ``rules``, a bad key, a bad ``grad_scale`` or ``per_sample``.
        ConditionError: For an invalid condition (the message lists the valid forms).
    """
    rules = to_plain(rules)
    if not isinstance(rules, Mapping) or not rules:
        raise ConfigurationError(
            f"{who}(rules=...) needs a non-empty dict {{selector: condition}}, got {rules!r}; "
            f'e.g. {who}({{"backbone": {{"epochs": [0, 3]}}}}).'
        )
    parsed: dict[str, Rule] = {}
    for key, spec in rules.items():
        if not isinstance(key, str) or not key.strip():
            raise ConfigurationError(
                f"{who}: rule key {key!r} must be a module selector or a gate name (a non-empty string)."
            )
        as_selector_list(key.removeprefix(GATE_PREFIX), argument=f"{who} rule key")
        parsed[key] = _parse_rule(key, spec, who=who, allow_grad_scale=allow_grad_scale)
    return parsed


def _parse_rule(key: str, spec: Any, *, who: str, allow_grad_scale: bool) -> Rule:
    if not (isinstance(spec, Mapping) and "when" in spec):
        return Rule(key, parse_condition(spec))
    extra = set(spec) - _RULE_KEYS if allow_grad_scale else set(spec) - {"when", "per_sample"}
    if extra:
        allowed = sorted(_RULE_KEYS if allow_grad_scale else {"when", "per_sample"})
        raise ConfigurationError(f"{who}: rule {key!r} has unknown key(s) {sorted(extra)}; allowed: {allowed}.")
    scale = spec.get("grad_scale", 0.0)
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ConfigurationError(
            f"{who}: rule {key!r} has grad_scale={scale!r}; expected a finite number "
            "(0 cuts the gradient, 0.1 scales it, -1 reverses it)."
        )
    per_sample = spec.get("per_sample", False)
    if not isinstance(per_sample, bool):
        raise ConfigurationError(f"{who}: rule {key!r} has per_sample={per_sample!r}; expected true or false.")
    return Rule(key, parse_condition(spec["when"]), float(scale), per_sample)


def sample_mask(cond: Condition, ctx: StepContext, x: Tensor, salt: str) -> Tensor:
    """Evaluate ``cond`` per batch row of ``x``: a bool ``(B,)`` tensor on ``x``'s device.

    Statistics and probabilities are per row; step/epoch windows hold for the whole batch.
    """
    batch = x.shape[0]
    if isinstance(cond, Statistic):
        return cond.per_sample(x)
    if isinstance(cond, Probability):
        return cond.per_sample(ctx, batch, salt=salt, device=x.device)
    if isinstance(cond, AnyOf):  # before AllOf: AnyOf subclasses it
        masks = [sample_mask(c, ctx, x, salt) for c in cond.conditions]
        return torch.stack(masks).any(0)
    if isinstance(cond, AllOf):
        masks = [sample_mask(c, ctx, x, salt) for c in cond.conditions]
        return torch.stack(masks).all(0)
    return torch.full((batch,), bool(cond(ctx, x, salt=salt)), dtype=torch.bool, device=x.device)


def decide(rule: Rule, ctx: StepContext, x: Tensor | None, salt: str) -> bool | Tensor:
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
        if x.dim() == 0:  # type: ignore[union-attr]
            raise ConditionError(f"per-sample rule {rule.key!r} on {salt!r} got a 0-d tensor; it needs a batch dim.")
        return sample_mask(rule.condition, ctx, x, salt)  # type: ignore[arg-type]
    if ctx.sharded:  # FSDP2: ranks deciding differently would issue different collectives and hang
        return holds_on_all_ranks(rule.condition, ctx, x, salt)
    return bool(rule.condition(ctx, x if rule.condition.needs_activation else None, salt=salt))


def apply_rule(rule: Rule, ctx: StepContext, name: str, output: Any) -> tuple[Any, bool | Tensor]:
    """Decide ``rule`` on ``output`` (of the module or gate ``name``) and detach or scale its gradient accordingly.

    Returns the (possibly) changed output and the decision (a bool, or a ``(B,)`` bool tensor per sample).
    """
    decision = decide(rule, ctx, first_tensor(output), salt=name)
    if rule.grad_scale == 0.0:
        return detach_if(output, decision), decision
    if isinstance(decision, bool):
        return (scale_grad(output, rule.grad_scale) if decision else output), decision
    if not bool(decision.any()):
        return output, decision
    factors = decision.to(first_tensor(output).dtype) * (rule.grad_scale - 1.0) + 1.0  # type: ignore[union-attr]
    return scale_grad(output, factors), decision


def resolve_targets(
    model: nn.Module, rules: dict[str, Rule], *, who: str, allow_gates: bool
) -> tuple[dict[str, list[tuple[str, nn.Module]]], list[str]]:
    """Split rule keys into module rules ``{key: [(name, module)]}`` and gate names, checking the model.

    Raises:
        SelectorError: If a key matches no module (and is no possible gate), or two keys select one module.
    """
    modules: dict[str, list[tuple[str, nn.Module]]] = {}
    gates: list[str] = []
    owner: dict[str, str] = {}
    is_mixin = isinstance(model, PartialBackpropMixin)
    for key in rules:
        if key.startswith(GATE_PREFIX) or (allow_gates and is_mixin and not _matches_any(model, key)):
            if not allow_gates:
                raise SelectorError(f"{who}: rule {key!r} names a gate; {who} rules name modules (selectors) only.")
            if not is_mixin:
                raise SelectorError(
                    f"{who}: rule {key!r} names a gate, but {type(model).__name__} has no gates; gates need "
                    f"`class {type(model).__name__}(PartialBackpropMixin, L.LightningModule)` and "
                    f"`self.gate({key.removeprefix(GATE_PREFIX)!r}, x)` in forward."
                )
            gates.append(key)
            continue
        try:
            hits = select_modules(model, key)
        except SelectorError as err:
            hint = " (gate names need a PartialBackpropMixin model)" if allow_gates else ""
            raise SelectorError(f"{who}: {err}{hint}") from None
        for name, _ in hits:
            if name in owner:
                raise SelectorError(
                    f"{who}: module {name!r} is selected by both rule {owner[name]!r} and rule {key!r}; "
                    "give each module one rule (combine conditions with {'any': [...]})."
                )
            owner[name] = key
        modules[key] = hits
    return modules, gates


def _matches_any(model: nn.Module, key: str) -> bool:
    try:
        select_modules(model, key)
    except SelectorError:
        return False
    return True


class DynamicGraphCallback(Technique):
    """Base of the conditional callbacks: step context, counters, logging, gate checks, DDP setup, resume."""

    log_prefix = "dynamic"
    verb = "held"

    def __init__(self, rules: dict[str, Rule], *, log: bool = True, accept_config_change: bool = False) -> None:
        super().__init__(accept_config_change=accept_config_change)
        if not isinstance(log, bool):
            raise ConfigurationError(f"`log` must be true or false, got {log!r}.")
        self.rules = rules
        self.log = log
        self._ctx: StepContext | None = None  # set only between on_train_batch_start and on_train_batch_end
        self.epoch_counts: dict[str, list[float]] = {key: [0.0, 0.0] for key in rules}
        self.totals: dict[str, list[float]] = {key: [0.0, 0.0] for key in rules}
        self._counts_epoch = 0  # the epoch epoch_counts belong to
        self._gates: list[str] = []
        self._gates_seen: set[str] = set()
        self._gate_watch: Any = None

    @override
    def config(self) -> dict[str, Any]:
        return {"rules": {key: repr(rule) for key, rule in self.rules.items()}}

    def fractions(self) -> dict[str, float]:
        """Per rule key, the fraction of decisions (steps x modules, or samples) that held since fit started."""
        return {key: (float(hits) / total if total else 0.0) for key, (hits, total) in self.totals.items()}

    @override
    def run_summary(self) -> list[str]:
        name = type(self).__name__
        return [f"{name} {key}: {self.verb} {100.0 * f:.1f}% of decisions" for key, f in self.fractions().items()]

    # -- hooks ---------------------------------------------------------------------------------------------
    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        who = type(self).__name__
        self._attach_rules(pl_module)
        if self._gates:
            self._gates_seen = set()
            self._gate_watch = self.handles.add(watch_gates(pl_module, self._gates_seen))
        if any(rule.cuts_graph for rule in self.rules.values()):
            # Runs before the strategy wraps the model: the only point where DDP's options can still change.
            allow_unused_parameters(trainer, who, reason=self._ddp_reason())

    @override
    def detach(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        self._ctx = None
        self._gate_watch = None

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._ctx = StepContext.from_trainer(trainer, batch_idx)
        if trainer.current_epoch != self._counts_epoch:  # not in on_train_epoch_start: a resume may skip that hook
            self._counts_epoch = trainer.current_epoch
            self.epoch_counts = {key: [0.0, 0.0] for key in self.rules}
        if self._gate_watch is not None:  # gates that ran only in the sanity check do not count
            self._gates_seen.clear()

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._check_gates(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check_gates(pl_module)
        self._ctx = None

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log:
            return
        # Every rank logs every key once per epoch, so the cross-rank mean (sync_dist) cannot wait on a missing key.
        for key, (hits, total) in self.epoch_counts.items():
            fraction = float(hits) / total if total else 0.0
            pl_module.log(f"{self.log_prefix}/{key}", fraction, on_epoch=True, sync_dist=True)

    @override
    def technique_state(self) -> dict[str, Any]:
        return {
            "totals": {key: [float(v) for v in value] for key, value in self.totals.items()},
            "epoch_counts": {key: [float(v) for v in value] for key, value in self.epoch_counts.items()},
            "counts_epoch": self._counts_epoch,
        }

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        for attr in ("totals", "epoch_counts"):
            counts = getattr(self, attr)
            for key, value in state.get(attr, {}).items():
                counts[key] = list(value)
        self._counts_epoch = int(state.get("counts_epoch", self._counts_epoch))

    # -- for subclasses ------------------------------------------------------------------------------------
    def _attach_rules(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _ddp_reason(self) -> str:
        raise NotImplementedError

    def _count(self, key: str, decision: bool | Tensor) -> None:
        # Per-sample decisions stay on their device: float() here would sync the GPU once per rule per step.
        # Counts become floats only where they are read (fractions, logging, state_dict).
        hits, total = (decision.sum(), decision.numel()) if isinstance(decision, Tensor) else (float(decision), 1)
        for counts in (self.totals.setdefault(key, [0.0, 0.0]), self.epoch_counts.setdefault(key, [0.0, 0.0])):
            counts[0] += hits  # type: ignore[assignment]  # a 0-d tensor for per-sample rules: no sync here
            counts[1] += total

    def _check_gates(self, pl_module: nn.Module) -> None:
        if self._gate_watch is None or self._ctx is None:
            return
        watch, self._gate_watch = self._gate_watch, None
        watch.remove()
        missing = [key for key in self._gates if key.removeprefix(GATE_PREFIX) not in self._gates_seen]
        if missing:
            raise SelectorError(
                f"{type(self).__name__}: rule(s) {missing} name neither a module nor a gate that ran during the first "
                f"training step. Gates that ran: {sorted(self._gates_seen) or 'none'}. Fix: use one of those names, a "
                "module name (print(dict(model.named_modules()).keys())), or call self.gate(name, x) in forward."
            )
