from __future__ import annotations

import pickle

import pytest
import torch
from omegaconf import OmegaConf

from lit_partial.conditions import (
    AllOf,
    Always,
    AnyOf,
    ConditionError,
    EpochWindow,
    EveryNSteps,
    Never,
    Probability,
    Statistic,
    StepContext,
    StepWindow,
    parse_condition,
    uniform_draw,
)


def ctx(epoch: int = 0, step: int = 0, batch_idx: int = 0) -> StepContext:
    return StepContext(epoch=epoch, global_step=step, batch_idx=batch_idx)


def test_always_never() -> None:
    assert parse_condition("always") == Always() and parse_condition("never") == Never()
    assert parse_condition("always")(ctx()) and not parse_condition("never")(ctx())


def test_epoch_window_switches_at_bounds() -> None:
    cond = parse_condition({"epochs": [1, 3]})
    assert cond == EpochWindow(1, 3)
    assert [cond(ctx(epoch=e)) for e in range(5)] == [False, True, True, False, False]


def test_open_ended_windows() -> None:
    assert [parse_condition({"epochs": [2, None]})(ctx(epoch=e)) for e in (1, 2, 100)] == [False, True, True]
    assert [parse_condition({"steps": [0, None]})(ctx(step=s)) for s in (0, 10**6)] == [True, True]


def test_step_window_switches_at_bounds() -> None:
    cond = parse_condition({"steps": [2, 4]})
    assert cond == StepWindow(2, 4)
    assert [cond(ctx(step=s)) for s in range(6)] == [False, False, True, True, False, False]


def test_every_n_steps_with_offset() -> None:
    cond = parse_condition({"every_n_steps": 3, "offset": 1})
    assert cond == EveryNSteps(3, 1)
    assert [s for s in range(10) if cond(ctx(step=s))] == [1, 4, 7]


def test_probability_rate_and_determinism() -> None:
    cond = parse_condition({"probability": 0.25, "seed": 3})
    draws = [cond(ctx(step=s), salt="blocks.1") for s in range(20000)]
    assert abs(sum(draws) / len(draws) - 0.25) < 0.01
    # Same (seed, salt, step, batch) -> same decision, whatever global RNG state: identical on every rank/resume.
    torch.manual_seed(123)
    assert draws[:200] == [cond(ctx(step=s), salt="blocks.1") for s in range(200)]


def test_probability_independent_of_salt_seed_and_batch() -> None:
    cond = Probability(0.5, seed=0)
    base = [cond(ctx(step=s), salt="a") for s in range(500)]
    assert base != [cond(ctx(step=s), salt="b") for s in range(500)]
    assert base != [Probability(0.5, seed=1)(ctx(step=s), salt="a") for s in range(500)]
    assert base != [cond(ctx(step=s, batch_idx=1), salt="a") for s in range(500)]


def test_probability_extremes() -> None:
    assert not any(Probability(0.0)(ctx(step=s)) for s in range(200))
    assert all(Probability(1.0)(ctx(step=s)) for s in range(200))


def test_probability_survives_pickle_for_spawned_processes() -> None:
    cond = Probability(0.5, seed=7)
    clone = pickle.loads(pickle.dumps(cond))
    assert [clone(ctx(step=s)) for s in range(100)] == [cond(ctx(step=s)) for s in range(100)]


def test_probability_per_sample_deterministic_rate() -> None:
    cond = Probability(0.3, seed=1)
    a = cond.per_sample(ctx(step=5), 4000, salt="x")
    assert torch.equal(a, cond.per_sample(ctx(step=5), 4000, salt="x"))
    assert abs(a.float().mean().item() - 0.3) < 0.03


def test_uniform_draw_range_and_spread() -> None:
    values = [uniform_draw(0, "s", i) for i in range(5000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.02


@pytest.mark.parametrize(
    ("stat", "op", "value", "x", "expected"),
    [
        ("mean", ">", 0.0, [1.0, 2.0], True),
        ("mean", "<", 0.0, [1.0, 2.0], False),
        ("max", ">=", 2.0, [1.0, 2.0], True),
        ("min", "==", -1.0, [-1.0, 3.0], True),
        ("norm", ">", 4.9, [3.0, 4.0], True),
        ("abs_mean", "<=", 1.5, [-1.0, 2.0], True),
        ("std", "!=", 0.0, [1.0, 1.0], False),
    ],
)
def test_statistic(stat: str, op: str, value: float, x: list[float], expected: bool) -> None:
    cond = parse_condition({"stat": stat, "op": op, "value": value})
    assert isinstance(cond, Statistic) and cond.needs_activation
    assert cond(ctx(), torch.tensor(x)) is expected


def test_statistic_per_sample() -> None:
    cond = parse_condition({"stat": "mean", "op": ">", "value": 0.0})
    x = torch.tensor([[1.0, 2.0], [-3.0, 1.0], [0.5, 0.0]])
    assert cond.per_sample(x).tolist() == [True, False, True]


def test_statistic_without_activation() -> None:
    with pytest.raises(ConditionError, match="needs the activation tensor"):
        parse_condition({"stat": "mean", "op": ">", "value": 0.0})(ctx())


def test_all_any_compose() -> None:
    cond = parse_condition({"all": [{"epochs": [0, 2]}, {"every_n_steps": 2}]})
    assert isinstance(cond, AllOf) and not cond.is_random
    assert [cond(ctx(epoch=e, step=s)) for e, s in [(0, 0), (0, 1), (2, 2)]] == [True, False, False]
    anyc = parse_condition({"any": ["never", {"probability": 1.0}]})
    assert isinstance(anyc, AnyOf) and anyc.is_random and anyc(ctx())
    assert parse_condition({"all": [{"stat": "max", "op": ">", "value": 0}]}).needs_activation


def test_accepts_omegaconf_and_condition_instances() -> None:
    assert parse_condition(OmegaConf.create({"epochs": [0, 3]})) == EpochWindow(0, 3)
    cond = EveryNSteps(2)
    assert parse_condition(cond) is cond


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("sometimes", r"invalid condition 'sometimes'\. Valid forms: \"always\""),
        ("__import__('os')", r"invalid condition"),  # never evaluated
        ({"epoch": [0, 1]}, r"invalid condition .*Valid forms"),
        (42, r"invalid condition 42"),
        ({"epochs": [3, 1]}, r"end 1 must be greater than start 3"),
        ({"epochs": [0]}, r"must be a pair \[start, end\]"),
        ({"epochs": "0-3"}, r"must be a pair"),
        ({"steps": [-1, 3]}, r"`steps\[0\]` must be an integer >= 0, got -1"),
        ({"steps": [0.5, 3]}, r"must be an integer"),
        ({"every_n_steps": 0}, r"`every_n_steps` must be an integer >= 1, got 0"),
        ({"every_n_steps": 2, "offset": -1}, r"`offset` must be an integer >= 0"),
        ({"probability": 1.5}, r"`probability` must be a number in \[0, 1\], got 1\.5"),
        ({"probability": "half"}, r"`probability` must be a number"),
        ({"probability": 0.5, "seed": -2}, r"`seed` must be an integer"),
        ({"probability": 0.5, "warmup_steps": -1}, r"`warmup_steps` must be an integer >= 0, got -1"),
        ({"probability": 0.5, "warmup_steps": 2.5}, r"`warmup_steps` must be an integer >= 0, got 2\.5"),
        ({"probability": 0.5, "warmup_steps": True}, r"`warmup_steps` must be an integer >= 0, got True"),
        ({"stat": "median", "op": ">", "value": 0}, r"`stat` must be one of \['abs_mean'"),
        ({"stat": "mean", "op": "=>", "value": 0}, r"`op` must be one of"),
        ({"stat": "mean", "op": ">", "value": float("nan")}, r"`value` must be a finite number"),
        ({"stat": "mean", "op": ">", "value": 0, "extra": 1}, r"unexpected key\(s\) \['extra'\]"),
        ({"all": []}, r"`all` must be a non-empty list"),
        ({"any": ["bogus"]}, r"invalid condition 'bogus'"),
    ],
)
def test_invalid_forms(spec: object, match: str) -> None:
    with pytest.raises(ConditionError, match=match):
        parse_condition(spec)


def test_probability_warmup_ramps_the_rate_linearly_from_zero() -> None:
    cond = parse_condition({"probability": 0.4, "warmup_steps": 10, "seed": 3})
    assert cond == Probability(0.4, seed=3, warmup_steps=10)
    assert [cond.rate(ctx(step=s)) for s in (0, 1, 5, 10, 11, 1000)] == pytest.approx([0, 0.04, 0.2, 0.4, 0.4, 0.4])
    # the same draw against the ramped rate: a step held during the warm-up also holds after it
    for step in range(40):
        draw = uniform_draw(3, "blocks.1", step, 0)
        assert cond(ctx(step=step), salt="blocks.1") == (draw < 0.4 * min(1.0, step / 10)), step
    rows = cond.per_sample(ctx(step=2), 4096, salt="a")  # per sample at step 2: probability 0.08
    assert float(rows.float().mean()) == pytest.approx(0.08, abs=0.015)
    assert not cond.per_sample(ctx(step=0), 64, salt="a").any()


def test_probability_without_warmup_reads_as_before() -> None:
    # configurations are compared by repr on resume: a rule written before warmup_steps existed must read the same
    assert repr(parse_condition({"probability": 0.5})) == "Probability(p=0.5, seed=0)"
    assert repr(Probability(0.5, 1, 8)) == "Probability(p=0.5, seed=1, warmup_steps=8)"
