"""Rules of the conditional techniques: ``{key: condition | {"when": ..., "grad_scale": g, "per_sample": b}}``.

Parsing (:func:`parse_rules` into :class:`Rule`), acting on a decision (:func:`apply_decision`), and resolving rule
keys to modules and gates (:func:`resolve_targets`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_partial._plain import to_plain
from lit_partial.conditions import Condition, parse_condition
from lit_partial.errors import ConfigurationError
from lit_partial.functional.gradients import detach_if, scale_grad
from lit_partial.module import PartialBackpropMixin
from lit_partial.selectors import CLASS_PREFIX, SelectorError, as_selector_list, select_modules
from lit_partial.tree import first_tensor

__all__ = ["GATE_PREFIX", "Rule", "apply_decision", "may_hold", "parse_rules", "resolve_targets"]

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
