"""The former single module of the conditional techniques' machinery; every name stays importable from here.

The code lives in :mod:`~lit_partial.callbacks._rule_spec` (rules: parsing, acting, resolving),
:mod:`~lit_partial.callbacks._decisions` (:class:`RuleTarget`: decisions made before the step) and
:mod:`~lit_partial.callbacks._conditional` (:class:`ConditionalTechnique`, formerly ``DynamicGraphCallback``).
"""

from __future__ import annotations

from lit_partial.callbacks._conditional import ConditionalTechnique, DynamicGraphCallback
from lit_partial.callbacks._decisions import DECIDE_IN_HOOK, EVALUATE, RuleTarget, Target, batch_size_of
from lit_partial.callbacks._rule_spec import GATE_PREFIX, Rule, apply_decision, may_hold, parse_rules, resolve_targets

__all__ = [
    "DECIDE_IN_HOOK",
    "EVALUATE",
    "GATE_PREFIX",
    "ConditionalTechnique",
    "DynamicGraphCallback",
    "Rule",
    "RuleTarget",
    "Target",
    "apply_decision",
    "batch_size_of",
    "may_hold",
    "parse_rules",
    "resolve_targets",
]
