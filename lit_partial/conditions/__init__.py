"""When-rules: small validated objects that say whether a rule holds at a training step.

Conditions are data, never code: each is built from a plain dict (or the strings ``"always"`` /
``"never"``) by :func:`parse_condition`, and no string is ever evaluated.

======================================================  ===============================================
form                                                    holds when
======================================================  ===============================================
``"always"`` / ``"never"``                              always / never
``{"epochs": [a, b]}``                                  ``a <= epoch < b`` (``b`` may be ``null``: open)
``{"steps": [a, b]}``                                   ``a <= global_step < b``
``{"every_n_steps": n, "offset": k}``                   ``global_step % n == k`` (``offset`` optional)
``{"probability": p, "seed": s}``                       a draw below ``p``, the same on every rank
``{"probability": p, "warmup_steps": n}``               a draw below ``p * min(1, global_step / n)``
``{"stat": s, "op": o, "value": v}``                    ``stat(activation) o v``, e.g. mean > 0
``{"metric": m, "op": o, "value": v}``                  the last logged value of ``m`` satisfies ``o v``
``{"plateau": m, "mode": "min", "patience": p}``        ``m`` has not improved for ``p`` evaluations
``{"all": [...]}`` / ``{"any": [...]}``                 every / some listed condition holds
======================================================  ===============================================

Probability draws are a pure function of ``(seed, salt, global_step, batch_idx)``: identical on every
rank and after resume, independent of global RNG state. ``salt`` distinguishes rules (callbacks pass
the rule's name).

Metric conditions read :attr:`StepContext.metrics`: the values of each metric at the evaluations so far
(callbacks record them as Lightning's ``EarlyStopping`` checks its monitor, the same on every rank, and save
them for resume). ``{"plateau": "val_loss", "mode": "min", "patience": 2, "min_delta": 0.0}`` holds while the
last ``patience`` evaluations brought no improvement over the best value before them (improvement: lower than
the best by more than ``min_delta`` for ``"min"``, higher for ``"max"``; NaN never improves).

Example:
    >>> cond = parse_condition({"epochs": [0, 3]})
    >>> cond(StepContext(epoch=2, global_step=40)), cond(StepContext(epoch=3, global_step=60))
    (True, False)
    >>> p = parse_condition({"probability": 0.5, "seed": 1})
    >>> p(StepContext(global_step=7), salt="head") == p(StepContext(global_step=7), salt="head")
    True
    >>> plateau = parse_condition({"plateau": "val_loss", "mode": "min", "patience": 2})
    >>> plateau(StepContext(metrics={"val_loss": (0.9, 0.5, 0.6, 0.55)}))
    True

Each condition also binds itself before a step (what callbacks do, so hooks only read the result) and gives back
the plain data it was built from, every default filled in (what checkpoints record):

    >>> parse_condition({"all": [{"steps": [0, 2]}, {"stat": "mean", "op": ">", "value": 0}]}).bind(StepContext())
    Statistic(stat='mean', op='>', value=0.0)
    >>> parse_condition({"probability": 0.25}).to_spec()
    {'probability': 0.25, 'seed': 0, 'warmup_steps': 0}

The package: ``_base`` (the :class:`Condition` contract, :class:`StepContext`, seeded draws), ``_kinds`` (one class
per form), ``_parse`` (:func:`parse_condition`).
"""

from __future__ import annotations

from lit_partial.conditions._base import (
    Always,
    Condition,
    Never,
    StepCondition,
    StepContext,
    salt_hash,
    uniform_draw,
)
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
    metric_names,
    plateau_wait,
)
from lit_partial.conditions._parse import VALID_FORMS, parse_condition
from lit_partial.errors import ConditionError

__all__ = [
    "COMPARISONS",
    "STATISTICS",
    "VALID_FORMS",
    "AllOf",
    "Always",
    "AnyOf",
    "Condition",
    "ConditionError",
    "EpochWindow",
    "EveryNSteps",
    "Metric",
    "Never",
    "Plateau",
    "Probability",
    "Statistic",
    "StepCondition",
    "StepContext",
    "StepWindow",
    "metric_names",
    "parse_condition",
    "plateau_wait",
    "salt_hash",
    "uniform_draw",
]
