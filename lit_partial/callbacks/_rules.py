"""Shared machinery of ConditionalDetach and ConditionalSkip (and ActivationDetach's conditional cuts).

Rule parsing, target resolution, decisions made at the start of each step (:class:`Target`: what hooks read, so
a compiled model recompiles only per distinct pattern of decisions), per-rule counters and logging, metric
conditions' history, and making DDP accept a graph that changes from step to step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lit_partial._plain import to_plain
from lit_partial.callbacks._metrics import MetricRecorder
from lit_partial.callbacks.base import Technique
from lit_partial.conditions import Condition, ConditionError, Never, StepContext, parse_condition
from lit_partial.distributed import allow_unused_parameters
from lit_partial.errors import ConfigurationError
from lit_partial.functional.gradients import detach_if, scale_grad
from lit_partial.handles import watch_gates
from lit_partial.module import PartialBackpropMixin
from lit_partial.selection import CLASS_PREFIX, SelectorError, as_selector_list, canonical_name, select_modules
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

    def to_spec(self, *, grad_scale: bool = True) -> dict[str, Any]:
        """The rule as the plain data it parses from, every default filled in (``grad_scale`` where rules have it).

        Example:
            >>> parse_rules({"stem": {"steps": [0, 2]}}, who="X", allow_grad_scale=True)["stem"].to_spec()
            {'when': {'steps': [0, 2]}, 'grad_scale': 0.0, 'per_sample': False}
        """
        spec: dict[str, Any] = {"when": self.condition.to_spec()}
        if grad_scale:
            spec["grad_scale"] = self.grad_scale
        spec["per_sample"] = self.per_sample
        return spec

    @property
    def cuts_graph(self) -> bool:
        """True when the rule can leave upstream parameters without any gradient on some step."""
        return not self.per_sample and self.grad_scale == 0.0 and self.condition.constant is not False


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


def may_hold(decision: Tensor) -> bool:
    """Whether a per-sample decision may hold for some row (True while compiling: no host sync in a graph).

    Under ``torch.compile`` the row-wise ``where`` is applied even when no row holds: it changes nothing
    (forward values and gradients are bit-identical), and reading ``decision.any()`` would break the graph.
    """
    return torch.compiler.is_compiling() or bool(decision.any())


def apply_decision(rule: Rule, decision: bool | Tensor, output: Any) -> Any:
    """Detach or scale the gradient through ``output`` as ``rule`` says, for a decision already made."""
    if rule.grad_scale == 0.0:
        return detach_if(output, decision)
    if isinstance(decision, bool):
        return scale_grad(output, rule.grad_scale) if decision else output
    if not may_hold(decision):
        return output
    factors = decision.to(first_tensor(output).dtype) * (rule.grad_scale - 1.0) + 1.0  # type: ignore[union-attr]  # a tensor
    return scale_grad(output, factors)


# -- decisions made before the step (what keeps hooks compile-friendly) ----------------------------------------
#
# Hooks run inside the model's forward, i.e. inside a compiled region when the model is compiled. Anything a hook
# reads that changes every step (the step number, a draw, a counter) would make Dynamo recompile every step, and
# zlib.crc32 or Tensor.item() would break the graph. So every rule is decided in on_train_batch_start, in plain
# Python, for every target (module or gate) it acts on; the hook reads only `Target.decision`: None (not in a
# training step), a bool, or a (B,) bool tensor. Dynamo guards a bool by value and a tensor by its metadata, so a
# compiled model gets one graph per distinct pattern of decisions. What a rule can only decide on the activation
# (statistics) is left as a bound condition whose other leaves are already decided, and evaluated in the hook.

EVALUATE = "evaluate"  # Target.decision when the hook must evaluate `Target.bound` on the activation
_NEVER = Never()
_NO_CONTEXT = StepContext()  # what a bound condition is called with: its step-dependent leaves are decided already


@dataclass(eq=False)
class Target:
    """One module or gate a rule acts on, and the rule's decision for the current training step.

    Attributes:
        rule: The rule.
        name: The module or gate name (the salt of the rule's draws).
        decision: None outside training steps; a bool, or a ``(B,)`` bool CPU tensor for per-sample rules, when
            decided before the step; :data:`EVALUATE` when the hook evaluates :attr:`bound` on the activation.
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
        self.decision = EVALUATE
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


def batch_size_of(batch: Any) -> int | None:
    """The first dimension of the first tensor of ``batch`` (None if it holds no tensor with a dimension)."""
    t = first_tensor(batch, floating=False)
    return int(t.shape[0]) if t is not None and t.dim() > 0 else None


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
        maybe_gate = allow_gates and is_mixin and not key.startswith(CLASS_PREFIX)  # a class is never a gate
        if key.startswith(GATE_PREFIX) or (maybe_gate and not _matches_any(model, key)):
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
    """Base of the conditional callbacks: decisions per step, counters, logging, gate checks, DDP setup, resume.

    Every rule is decided for every target at the start of each training step (:meth:`begin_step`), outside
    the model's forward, so hooks only read :attr:`Target.decision` and a compiled model recompiles only for a
    new pattern of decisions (see the ``torch.compile`` section of the README).
    """

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
        self._step_targets: dict[str, Target] = {}  # module or gate name -> its rule and this step's decision
        self._observed: list[tuple[str, bool | Tensor]] = []  # decisions hooks made on activations this step
        self.metric_recorder = MetricRecorder(
            (name for rule in rules.values() for name in rule.condition.metrics), who=type(self).__name__
        )
        self._gates: list[str] = []
        self._gates_seen: set[str] = set()
        self._gate_watch: Any = None

    @override
    def config(self) -> dict[str, Any]:
        return {"rules": {key: rule.to_spec() for key, rule in self.rules.items()}}

    @override
    def legacy_config(self) -> dict[str, Any] | None:
        # Checkpoints written before configurations were plain data recorded each rule as repr(Rule(...)).
        return {"rules": {key: repr(rule) for key, rule in self.rules.items()}}

    def fractions(self) -> dict[str, float]:
        """Per rule key, the fraction of decisions (steps x modules, or samples) that held since fit started."""
        return {key: (float(hits) / total if total else 0.0) for key, (hits, total) in self.totals.items()}

    @override
    def run_summary(self) -> list[str]:
        name = type(self).__name__
        return [f"{name} {key}: {self.verb} {100.0 * f:.1f}% of decisions" for key, f in self.fractions().items()]

    # -- the step ------------------------------------------------------------------------------------------
    def target(self, rule: Rule, name: str) -> Target:
        """The :class:`Target` of ``rule`` on module or gate ``name`` (created once; hooks read its decision)."""
        found = self._step_targets.get(name)
        if found is None or found.rule is not rule:
            # Draws are salted with the canonical name: compiling a submodule in place (which inserts `_orig_mod`
            # into the names below it) must not change them.
            found = self._step_targets[name] = Target(rule, canonical_name(name), observed=self._observed)
        return found

    def begin_step(self, ctx: StepContext, batch: Any = None) -> None:
        """Decide every rule on every target for the training step at ``ctx`` (``batch``: its size for draws)."""
        self._ctx = ctx
        size = batch_size_of(batch)
        for target in self._step_targets.values():
            counted = target.begin(ctx, size)
            if counted is not None:
                self._count(target.rule.key, *counted)

    def end_step(self) -> None:
        """Count what hooks decided on activations, and let hooks pass everything through until the next step."""
        for key, decision in self._observed:
            if isinstance(decision, Tensor):  # stays on its device: float() here would sync the GPU per step
                self._count(key, decision.sum(), float(decision.numel()))
            else:
                self._count(key, float(decision), 1.0)
        self._observed.clear()
        for target in self._step_targets.values():
            target.end()
        self._ctx = None

    # -- hooks ---------------------------------------------------------------------------------------------
    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        who = type(self).__name__
        self._step_targets = {}
        self._observed.clear()
        self._attach_rules(pl_module)
        self.metric_recorder.setup(trainer)
        if self._gates:
            self._gates_seen.clear()
            self._gate_watch = self.handles.add(watch_gates(pl_module, self._gates_seen))
        if any(rule.cuts_graph for rule in self.rules.values()):
            # Runs before the strategy wraps the model: the only point where DDP's options can still change.
            allow_unused_parameters(trainer, who, reason=self._ddp_reason())

    @override
    def detach(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        self.end_step()
        self._step_targets = {}
        self._gate_watch = None

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch != self._counts_epoch:  # not in on_train_epoch_start: a resume may skip that hook
            self._counts_epoch = trainer.current_epoch
            self.epoch_counts = {key: [0.0, 0.0] for key in self.rules}
        self._gates_seen.clear()  # gates that ran only in the sanity check (or validation) do not count
        ctx = StepContext.from_trainer(trainer, batch_idx)
        if self.metric_recorder:
            ctx = dataclasses.replace(ctx, metrics=self.metric_recorder.view())
        self.begin_step(ctx, batch)

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._check_gates(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._check_gates(pl_module)
        self._gates_seen.clear()  # empty whenever a forward starts: a compiled forward sees the same set every time
        self.end_step()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metric_recorder.on_validation_end(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metric_recorder.on_train_epoch_end(trainer)
        if not self.log:
            return
        # Every rank logs every key once per epoch, so the cross-rank mean (sync_dist) cannot wait on a missing key.
        for key, (hits, total) in self.epoch_counts.items():
            fraction = float(hits) / total if total else 0.0
            pl_module.log(f"{self.log_prefix}/{key}", fraction, on_epoch=True, sync_dist=True)

    @override
    def technique_state(self) -> dict[str, Any]:
        state = {
            "totals": {key: [float(v) for v in value] for key, value in self.totals.items()},
            "epoch_counts": {key: [float(v) for v in value] for key, value in self.epoch_counts.items()},
            "counts_epoch": self._counts_epoch,
        }
        if self.metric_recorder:
            state["metrics"] = self.metric_recorder.state()
        return state

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        for attr in ("totals", "epoch_counts"):
            counts = getattr(self, attr)
            for key, value in state.get(attr, {}).items():
                counts[key] = list(value)
        self._counts_epoch = int(state.get("counts_epoch", self._counts_epoch))
        self.metric_recorder.load(state.get("metrics"))

    # -- for subclasses ------------------------------------------------------------------------------------
    def _attach_rules(self, model: nn.Module) -> None:
        raise NotImplementedError

    def _ddp_reason(self) -> str:
        raise NotImplementedError

    def _count(self, key: str, hits: float | Tensor, total: float) -> None:
        # Hits of per-sample decisions made in forward stay on their device (a 0-d tensor): float() here would sync
        # the GPU once per rule per step. Counts become floats only where they are read (fractions, logging, state).
        for counts in (self.totals.setdefault(key, [0.0, 0.0]), self.epoch_counts.setdefault(key, [0.0, 0.0])):
            counts[0] += hits  # type: ignore[assignment]  # a 0-d tensor for per-sample rules: no sync here
            counts[1] += total

    def _check_gates(self, pl_module: nn.Module) -> None:
        # Once, after the first training forward. The watcher stays attached until teardown: removing it would
        # change what a compiled forward reads, and cost one recompilation.
        if self._gate_watch is None or self._ctx is None:
            return
        self._gate_watch = None
        missing = [key for key in self._gates if key.removeprefix(GATE_PREFIX) not in self._gates_seen]
        if missing:
            raise SelectorError(
                f"{type(self).__name__}: rule(s) {missing} name neither a module nor a gate that ran during the first "
                f"training step. Gates that ran: {sorted(self._gates_seen) or 'none'}. Fix: use one of those names, a "
                "module name (print(dict(model.named_modules()).keys())), or call self.gate(name, x) in forward."
            )
