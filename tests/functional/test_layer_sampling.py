"""Layer-sampling verbs: draws are a function of (seed, period) only, block orders as BAdam defines them."""

from __future__ import annotations

import random

import pytest
import torch

from lit_partial.functional.layer_sampling import (
    active_block,
    drop_optimizer_state,
    first_block,
    optimizer_state_bytes,
    sample_layers,
)


def test_draws_depend_on_seed_and_period_only_and_consume_no_global_rng() -> None:
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = [sample_layers(32, 4, seed=7, period=p) for p in range(50)]
    assert torch.equal(torch_state, torch.get_rng_state()) and python_state == random.getstate()
    assert first == [sample_layers(32, 4, seed=7, period=p) for p in range(50)]
    assert first != [sample_layers(32, 4, seed=8, period=p) for p in range(50)]
    counts = [sum(i in d for d in first) for i in range(32)]
    assert all(len(set(d)) == 4 for d in first) and min(counts) > 0  # uniform-ish: every layer drawn in 50 draws


def test_ascending_descending_and_fixed_orders() -> None:
    def order(kind: str, start: int | None = None) -> list[int]:
        return [active_block(s, 3, 2, kind, start) for s in range(8)]

    assert order("ascending") == [0, 0, 1, 1, 2, 2, 0, 0]
    assert order("descending") == [2, 2, 1, 1, 0, 0, 2, 2]
    assert order("descending", 0) == [0, 0, 2, 2, 1, 1, 0, 0]
    assert order("fixed", 1) == [1] * 8
    assert first_block(3, "descending", None) == 2 and first_block(3, "ascending", None) == 0


def test_dropped_state_restarts_the_next_update_and_keeps_the_group() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.0)
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1, weight_decay=0.0)
    for _ in range(2):
        w.grad = torch.full((3,), 2.0)
        opt.step()
    assert optimizer_state_bytes(opt) == 2 * 3 * 4 + 4
    assert drop_optimizer_state([opt], [w]) == 1 and optimizer_state_bytes(opt) == 0
    before = w.detach().clone()
    w.grad = torch.full((3,), 2.0)
    opt.step()
    (v,) = fresh.param_groups[0]["params"]
    v.grad = torch.full((3,), 2.0)
    fresh.step()
    assert torch.equal(w - before, v - torch.ones(3))  # the first Adam step again
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sample_layers(3, 4, 0, 0), r"num_active=4 must be between 0 and num_layers=3"),
        (lambda: active_block(0, 3, 1, "sideways"), r"order='sideways'; expected one of"),
    ],
)
def test_bad_arguments_are_refused(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]
