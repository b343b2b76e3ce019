"""Under torch.compile, LISA and BAdam switches really change what trains (pytorch #139476): bit-identical to eager,
one graph per distinct trainable set."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lit_partial import LISA, BAdam
from tests.callbacks._stack import assert_bitwise, loader, make
from tests.helpers import quiet_trainer
from tests.helpers.compile import BACKEND, dynamo_counts

N, STEPS = 4, 8

CASES = {  # name -> (callback factory, distinct trainable sets over the run)
    "lisa": (lambda: LISA("blocks.*", n_active=1, interval_steps=2, seed=3), 3),  # draws 0, 2, 1, 0
    "badam": (lambda: BAdam("blocks.*", switch_every=2, order="ascending"), 4),
}


def fit(name: str, compiled: bool) -> tuple[Any, int]:
    model = make(N)
    if compiled:
        model.compile(backend=BACKEND)
    with dynamo_counts() as counts:
        quiet_trainer(max_steps=STEPS, callbacks=[CASES[name][0]()]).fit(model, loader())
    return model, counts.graphs


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_switches_under_compile_equal_eager_bit_for_bit_in_one_graph_per_trainable_set(name: str) -> None:
    eager, _ = fit(name, compiled=False)
    compiled, graphs = fit(name, compiled=True)
    assert_bitwise(compiled, eager)
    start = make(N)
    trained = [not torch.equal(a.fc1.weight, b.fc1.weight) for a, b in zip(compiled.blocks, start.blocks, strict=True)]
    assert sum(trained) == CASES[name][1]  # every block of the schedule moved, the others did not
    assert graphs == CASES[name][1]
