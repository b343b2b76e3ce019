"""``ConditionalTechnique``: the base of the conditional techniques (decisions per step, counters, logging).

``DynamicGraphCallback`` is its former name.
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning as L
from torch import Tensor, nn
from typing_extensions import override

from lit_partial.callbacks._decisions import RuleTarget, batch_size_of
from lit_partial.callbacks._rule_spec import GATE_PREFIX, Rule
from lit_partial.callbacks.base import Technique
from lit_partial.conditions import StepContext
from lit_partial.distributed import allow_unused_parameters
from lit_partial.errors import ConfigurationError
from lit_partial.handles import watch_gates
from lit_partial.selectors import SelectorError, canonical_name

__all__ = ["ConditionalTechnique", "DynamicGraphCallback"]


class ConditionalTechnique(Technique):
    """Base of the conditional techniques: decisions per step, counters, logging, gate checks, DDP setup, resume.

    Every rule is decided for every target at the start of each training step (:meth:`begin_step`), outside
    the model's forward, so hooks only read :attr:`RuleTarget.decision` and a compiled model recompiles only for a
    new pattern of decisions (see the ``torch.compile`` section of the README). The history of the metrics that
    rules read is the base's (:attr:`Technique.metric_recorder`). A subclass that only acts (``ActivationDetach``)
    sets :attr:`counts_decisions` to False: no counters, no logging, nothing of its own to save.
    """

    log_prefix = "dynamic"
    verb = "held"
    #: Count the decisions per rule (saved, logged once per epoch, reported in :meth:`run_summary`).
    counts_decisions: ClassVar[bool] = True

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
        self._step_targets: dict[str, RuleTarget] = {}  # module or gate name -> its rule and this step's decision
        self._observed: list[tuple[str, bool | Tensor]] = []  # decisions hooks made on activations this step
        self._gates: list[str] = []
        self._gates_seen: set[str] = set()
        self._gate_watch: Any = None

    @override
    def metrics_read(self) -> list[str]:
        return [name for rule in self.rules.values() for name in rule.condition.metrics]

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
    def target(self, rule: Rule, name: str) -> RuleTarget:
        """The :class:`RuleTarget` of ``rule`` on module or gate ``name`` (created once; hooks read its decision)."""
        found = self._step_targets.get(name)
        if found is None or found.rule is not rule:
            # Draws are salted with the canonical name: compiling a submodule in place (which inserts `_orig_mod`
            # into the names below it) must not change them.
            found = self._step_targets[name] = RuleTarget(rule, canonical_name(name), observed=self._observed)
        return found

    def begin_step(self, ctx: StepContext, batch: Any = None) -> None:
        """Decide every rule on every target for the training step at ``ctx`` (``batch``: its size for draws)."""
        self._ctx = ctx
        size = batch_size_of(batch)
        for target in self._step_targets.values():
            counted = target.begin(ctx, size)
            if counted is not None and self.counts_decisions:
                self._count(target.rule.key, *counted)

    def end_step(self) -> None:
        """Count what hooks decided on activations, and let hooks pass everything through until the next step."""
        for key, decision in self._observed if self.counts_decisions else ():
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
        if self._gates:
            self._gates_seen.clear()
            self._gate_watch = self.handles.add(watch_gates(pl_module, self._gates_seen))
        if self._cuts_graph():
            # Runs before the strategy wraps the model: the only point where DDP's options can still change.
            allow_unused_parameters(trainer, who, reason=self._ddp_reason())

    @override
    def cleanup(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
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
        self.begin_step(self.step_context(trainer, batch_idx), batch)

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
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # the metric history first
        if not self.log or not self.counts_decisions:
            return
        # Every rank logs every key once per epoch, so the cross-rank mean (sync_dist) cannot wait on a missing key.
        for key, (hits, total) in self.epoch_counts.items():
            fraction = float(hits) / total if total else 0.0
            pl_module.log(f"{self.log_prefix}/{key}", fraction, on_epoch=True, sync_dist=True)

    @override
    def technique_state(self) -> dict[str, Any]:
        if not self.counts_decisions:
            return {}
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

    def _cuts_graph(self) -> bool:
        """Whether some step may leave parameters without any gradient (DDP must then accept unused ones)."""
        return any(rule.cuts_graph for rule in self.rules.values())

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


DynamicGraphCallback = ConditionalTechnique  # its former name
