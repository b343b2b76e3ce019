"""Rules decided before the step (what hooks read under torch.compile) decide exactly as deciding in the hook."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lit_partial.callbacks._rules import EVALUATE, Rule, Target, parse_rules
from lit_partial.conditions import StepContext
from tests.helpers.decisions import reference_decide

RULES: dict[str, Any] = {
    "window": {"steps": [2, 5]},
    "random": {"probability": 0.5, "seed": 3},
    "metric": {"metric": "val_loss", "op": "<", "value": 0.5},
    "stat": {"stat": "mean", "op": ">", "value": 0.0},
    "mixed": {"all": [{"probability": 0.7}, {"stat": "max", "op": ">", "value": 0.5}]},
    "either": {"any": [{"every_n_steps": 3}, {"probability": 0.2}]},
    "rows_random": {"when": {"probability": 0.5}, "per_sample": True},
    "rows_window": {"when": {"epochs": [1, 2]}, "per_sample": True},
    "rows_mixed": {
        "when": {"any": [{"probability": 0.3}, {"stat": "mean", "op": ">", "value": 0.2}]},
        "per_sample": True,
    },
}


@pytest.mark.parametrize("key", list(RULES))
def test_precomputed_decisions_equal_decisions_made_in_the_hook(key: str) -> None:
    rule: Rule = parse_rules({key: RULES[key]}, who="test", allow_grad_scale=True)[key]
    target = Target(rule, "blocks.1")
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        x = torch.randn(6, 3, generator=gen)
        ctx = StepContext(epoch=step // 4, global_step=step, batch_idx=step % 4, metrics={"val_loss": (1.0, 0.4)})
        target.begin(ctx, batch_size=6)
        got = target.resolve(x)
        want = reference_decide(rule, ctx, x, salt="blocks.1")
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor) and torch.equal(got, want)
        else:
            assert got is want
        target.end()
        assert target.resolve(x) is None  # outside a step: pass through


def test_only_activation_rules_are_left_to_the_hook() -> None:
    rules = parse_rules(RULES, who="test", allow_grad_scale=True)
    ctx = StepContext(global_step=1, metrics={"val_loss": (0.4,)})
    left = []
    for key, rule in rules.items():
        target = Target(rule, key)
        target.begin(ctx, batch_size=4)
        if target.decision == EVALUATE:
            left.append(key)
    assert left == ["stat", "mixed", "rows_mixed"]


def test_a_module_batch_other_than_the_loaders_draws_at_its_own_size() -> None:
    rule = parse_rules({"r": RULES["rows_random"]}, who="test", allow_grad_scale=False)["r"]
    target = Target(rule, "r")
    ctx = StepContext(global_step=3)
    target.begin(ctx, batch_size=None)  # the batch holds no tensor: drawn in the hook
    x = torch.randn(5, 2)
    assert torch.equal(target.resolve(x), reference_decide(rule, ctx, x, salt="r"))  # type: ignore[arg-type]
    target.end()
    target.begin(ctx, batch_size=8)  # the loader's batch is 8, the module sees 5 rows: drawn at 5 in the hook
    assert torch.equal(target.resolve(x), reference_decide(rule, ctx, x, salt="r"))  # type: ignore[arg-type]
