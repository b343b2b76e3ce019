"""AutoFreeze's rule: the percentile equals numpy's, and replayed traces freeze where the reference's loop does."""

from __future__ import annotations

import random

import pytest

from lit_partial.functional.adaptive_freezing import freeze_start, gradient_change, percentile

np = pytest.importorskip("numpy")


def reference_start(previous: list[float], current: list[float], start: int, q: float) -> int:
    """The rule as ``freeze_intermediate_e2e_lr.py`` writes it (its dicts as lists)."""
    threshold = [0.0] * len(current)
    for key in range(len(current)):
        if current[key] > 0:
            threshold[key] = abs(previous[key] - current[key]) / previous[key]
    median_value = np.percentile(threshold[start:], q)
    for key in range(len(threshold)):
        if threshold[key] >= median_value:
            return key
    return start


def test_percentile_equals_numpy_bit_for_bit() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        values = [rng.random() * rng.choice([1e-3, 1.0, 1e3]) for _ in range(rng.randint(1, 12))]
        q = rng.choice([0, 25, 50, 75, 100, rng.random() * 100])
        assert percentile(values, q) == float(np.percentile(values, q))


def test_a_replayed_trace_freezes_at_the_same_evaluations_as_the_reference() -> None:
    rng = random.Random(1)
    layers, start, ours = 6, 0, 0
    previous = [rng.uniform(1, 2) for _ in range(layers)]
    starts = []
    for _ in range(12):  # front layers converge first: their norms change less and less
        current = [
            0.0 if i < ours else p * (1 + rng.uniform(-1, 1) * 0.5 * (i + 1) / layers) for i, p in enumerate(previous)
        ]
        start = reference_start(previous, current, start, 50)
        ours = freeze_start(previous, current, ours, 50)
        assert ours == start
        starts.append(ours)
        previous = current
    assert starts[-1] > 0 and starts == sorted(starts)  # it froze something, front to back


def test_frozen_layers_stay_frozen_where_the_reference_thaws() -> None:
    previous, current = [0.0, 2.0, 2.0], [0.0, 2.0, 2.0]  # layer 0 frozen; nothing changed: the threshold is 0
    assert reference_start(previous, current, 1, 50) == 0  # the reference starts again from layer 0
    assert freeze_start(previous, current, 1, 50) == 1


def test_change_is_zero_for_frozen_layers_and_unbounded_from_zero() -> None:
    assert gradient_change([1.0, 0.0, 2.0], [0.0, 1.0, 1.0]) == [0.0, float("inf"), 0.5]


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="percentile of no values"):
        percentile([], 50)
