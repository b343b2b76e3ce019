"""Building conditions from plain data: :func:`parse_condition` (no string is ever evaluated)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lit_partial._plain import to_plain
from lit_partial.conditions._base import Always, Condition, Never
from lit_partial.conditions._kinds import (
    COMPARISONS,
    STATISTICS,
    AllOf,
    AnyOf,
    EpochWindow,
    EveryNSteps,
    Metric,
    Plateau,
    Probability,
    Statistic,
    StepWindow,
)
from lit_partial.errors import ConditionError

__all__ = ["VALID_FORMS", "parse_condition"]

VALID_FORMS = (
    '"always", "never", {"epochs": [a, b]}, {"steps": [a, b]}, {"every_n_steps": n}, '
    '{"probability": p, "warmup_steps": n}, '
    '{"stat": "mean"|"max"|"min"|"norm"|"std"|"abs_mean", "op": ">"|">="|"<"|"<="|"=="|"!=", '
    '"value": v}, {"metric": name, "op": ..., "value": v}, {"plateau": name, "mode": "min"|"max", "patience": p, '
    '"min_delta": d}, {"all": [...]}, {"any": [...]}'
)


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
