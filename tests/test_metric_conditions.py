from __future__ import annotations

import pytest
import torch

from lit_partial.callbacks._metrics import MetricRecorder
from lit_partial.conditions import (
    ConditionError,
    Metric,
    Plateau,
    StepContext,
    metric_names,
    parse_condition,
    plateau_wait,
    salt_hash,
    uniform_draw,
)


def at(**history: list[float]) -> StepContext:
    return StepContext(metrics={k: tuple(v) for k, v in history.items()})


def test_metric_holds_on_the_last_recorded_value_only() -> None:
    cond = parse_condition({"metric": "val_loss", "op": "<", "value": 0.3})
    assert cond == Metric("val_loss", "<", 0.3)
    assert not cond(StepContext())  # nothing recorded yet
    assert not cond(at(val_loss=[0.2, 0.4]))
    assert cond(at(val_loss=[0.4, 0.2]))


@pytest.mark.parametrize(
    ("history", "mode", "delta", "wait"),
    [
        ([], "min", 0.0, 0),
        ([1.0], "min", 0.0, 0),
        ([1.0, 1.0], "min", 0.0, 1),  # equal is no improvement
        ([1.0, 0.9, 0.95, 0.92], "min", 0.0, 2),
        ([1.0, 0.95], "min", 0.1, 1),  # within min_delta: no improvement
        ([1.0, 0.85], "min", 0.1, 0),
        ([0.5, 0.6, 0.55], "max", 0.0, 1),
        ([float("nan"), 1.0, float("nan")], "min", 0.0, 1),  # NaN never improves; the first number does
    ],
)
def test_plateau_wait_counts_evaluations_since_the_last_improvement(
    history: list[float], mode: str, delta: float, wait: int
) -> None:
    assert plateau_wait(history, mode, delta) == wait


def test_plateau_holds_once_patience_evaluations_brought_nothing() -> None:
    cond = parse_condition({"plateau": "val_loss", "mode": "min", "patience": 2, "min_delta": 0.0})
    assert cond == Plateau("val_loss", "min", 2, 0.0)
    assert [cond(at(val_loss=[1.0, 0.9, 0.95, 0.92][:n])) for n in range(5)] == [False, False, False, False, True]
    assert not cond(at(val_loss=[1.0, 0.9, 0.95, 0.92, 0.5]))  # improved again: no longer a plateau


def test_metric_names_are_collected_through_all_and_any() -> None:
    cond = parse_condition({"all": [{"plateau": "a"}, {"any": [{"metric": "b", "op": ">", "value": 1}, "always"]}]})
    assert metric_names(cond) == {"a", "b"}
    assert metric_names(parse_condition({"epochs": [0, 1]})) == frozenset()


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"metric": "val_loss", "op": "<"}, "`value` must be a finite number"),
        ({"metric": 3, "op": "<", "value": 1}, "must name a logged metric"),
        ({"plateau": "val_loss", "patience": 1.5}, "`patience` must be an integer"),
        ({"plateau": "val_loss", "mode": "best"}, "`mode` must be 'min'"),
        ({"plateau": "val_loss", "window": 3}, r"unexpected key\(s\) \['window'\]"),
    ],
)
def test_invalid_metric_conditions_name_the_problem(spec: dict[str, object], match: str) -> None:
    with pytest.raises(ConditionError, match=match):
        parse_condition(spec)


def test_salt_hash_is_zlibs_crc32_and_draws_are_unchanged() -> None:
    import zlib

    assert salt_hash("blocks.3") == zlib.crc32(b"blocks.3")
    assert uniform_draw(0, "blocks.3", 10) == pytest.approx(uniform_draw(0, "blocks.3", 10))


def test_metric_recorder_keeps_only_its_metrics_and_resumes() -> None:
    recorder = MetricRecorder(["val_loss"], who="X")
    recorder.record({"val_loss": torch.tensor(0.5), "other": 1.0})  # type: ignore[dict-item]
    state = recorder.state()
    again = MetricRecorder(["val_loss"], who="X")
    again.load(state)
    assert again.history == {"val_loss": [0.5]} and again.count == 1
    again.load(None)  # a checkpoint from before metric conditions
    assert again.history == {"val_loss": []} and not MetricRecorder([], who="X")
