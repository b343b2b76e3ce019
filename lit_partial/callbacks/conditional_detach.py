"""``ConditionalDetach``: stop (or scale) the gradient through a module's output while a condition holds."""

from __future__ import annotations

from typing import Any

from torch import nn

from lit_partial.callbacks._rules import (
    GATE_PREFIX,
    DynamicGraphCallback,
    Target,
    apply_decision,
    parse_rules,
    resolve_targets,
)
from lit_partial.handles import register_gate

__all__ = ["ConditionalDetach"]


class ConditionalDetach(DynamicGraphCallback):
    """Detach, scale or reverse the gradient through selected module outputs or gates, step by step.

    Each rule maps a key to a condition (see :mod:`lit_partial.conditions`). The key is a module selector
    (exact name, glob, ``re:<pattern>``; the module's output is ruled on through a forward hook) or the name
    of a gate the model calls in ``forward`` as ``self.gate(name, x)`` (write ``"gate:<name>"`` when a module
    has the same name). The value is a condition, or ``{"when": condition, "grad_scale": g, "per_sample": b}``:

    * ``grad_scale`` 0 (default) cuts the gradient, like ``.detach()`` written in ``forward`` (no backward is
      computed below it); another finite number scales it, a negative one reverses it (domain-adversarial
      training).
    * ``per_sample: true`` rules on each batch row: statistics are computed per row, probabilities drawn per
      row, and only the rows that meet the condition are detached (or scaled).

    Modules may return a tensor, or a tuple/list/dict of tensors (every floating tensor is ruled on; statistics
    look at the first one). Rules act only in training steps: validation, test and predict never detach.
    Random draws depend only on ``(seed, module or gate name, global_step, batch_idx)``, so they agree across
    ranks and after resume. Under DDP, a rule that can cut the graph makes the strategy run with
    ``find_unused_parameters=True`` (logged; set before the model is wrapped), so steps where ranks decide
    differently neither raise nor hang. Logs ``conditional_detach/<key>``: the fraction of steps (or samples)
    detached per epoch.

    Args:
        rules: ``{key: condition | {"when": condition, "grad_scale": g, "per_sample": bool}}``.
        log: Log the per-rule fractions with ``pl_module.log``.
        accept_config_change: Resume from a checkpoint made with other rules (see
            :class:`~lit_partial.callbacks.base.Technique`); by default that is an error naming what changed.

    Raises:
        ValueError: If ``rules`` is empty or not a dict, or a ``grad_scale``/``per_sample`` value is invalid.
        ConditionError: If a condition is invalid (the message lists the valid forms).
        SelectorError: At ``setup``, if a key matches no module (and the model is no mixin with gates); after the
            first training forward, if a gate name never ran (the message lists the gates that did).

    Example:
        >>> import lightning as L
        >>> from lit_partial.demos import DigitsClassifier, DigitsDataModule
        >>> detach = ConditionalDetach({
        ...     "backbone.0": {"epochs": [0, 1]},                       # first epoch: block 0 gets no gradient
        ...     "features": {"when": "always", "grad_scale": 0.5},      # the gate in forward: half the gradient
        ... })
        >>> model = DigitsClassifier()
        >>> trainer = L.Trainer(max_steps=2, callbacks=[detach], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(model, DigitsDataModule())
        >>> model.backbone[0][0].weight.grad is None, model.backbone[1][0].weight.grad is not None
        (True, True)
    """

    log_prefix = "conditional_detach"
    verb = "detached"

    def __init__(self, rules: dict[str, Any], log: bool = True, *, accept_config_change: bool = False) -> None:
        super().__init__(
            parse_rules(rules, who="ConditionalDetach", allow_grad_scale=True),
            log=log,
            accept_config_change=accept_config_change,
        )

    def _ddp_reason(self) -> str:
        cutting = [key for key, rule in self.rules.items() if rule.cuts_graph]
        return f"rules {cutting} detach outputs, so parameters below them get no gradient on those steps"

    def _attach_rules(self, model: nn.Module) -> None:
        modules, gates = resolve_targets(model, self.rules, who="ConditionalDetach", allow_gates=True)
        for key, targets in modules.items():
            for name, module in targets:
                self.handles.add(module.register_forward_hook(self._module_hook(self.target(self.rules[key], name))))
        self._gates = gates
        for key in gates:
            gate = key.removeprefix(GATE_PREFIX)
            self.handles.add(register_gate(model, gate, self._gate_fn(self.target(self.rules[key], gate))))

    @staticmethod
    def _module_hook(target: Target) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            return _apply(target, output)

        return hook

    @staticmethod
    def _gate_fn(target: Target) -> Any:
        def fn(x: Any) -> Any:
            return _apply(target, x)

        return fn


def _apply(target: Target, output: Any) -> Any:
    # Runs inside forward (a compiled region when the model is compiled): reads the step's decision, nothing else.
    decision = target.resolve(output)
    if decision is None:  # not inside a training step: validation, test, predict or a plain call
        return output
    return apply_decision(target.rule, decision, output)
