"""LISA, BAdam and AdaptiveFreezing under DDP (2 gloo processes, different samples per rank): no unused-parameter
error, ranks bit-identical (the same draws and freezes, the units' gradients averaged), and the schedule acted."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lit_partial import LISA, AdaptiveFreezing, BAdam
from lit_partial.functional.layer_sampling import active_block, sample_layers
from tests.callbacks._stack import loader, make
from tests.helpers import SaveParamsPerRank, assert_states_bitwise_equal, load_rank_states, quiet_trainer

N, STEPS = 4, 6

CALLBACKS = {
    "lisa": lambda: LISA("blocks.*", n_active=1, interval_steps=2, seed=3),
    "badam": lambda: BAdam("blocks.*", switch_every=2, order="ascending"),
    "adaptive_freezing": lambda: AdaptiveFreezing("blocks.*", every_n_steps=1),
}
#: The blocks each schedule trains over the run (AdaptiveFreezing: all, the front ones until they freeze).
TRAINED = {
    "lisa": {i for s in range(0, STEPS, 2) for i in sample_layers(N, 1, 3, s // 2)},
    "badam": {active_block(s, N, 2, "ascending") for s in range(STEPS)},
    "adaptive_freezing": set(range(N)),
}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_ddp_ranks_stay_bit_identical_and_train_what_the_schedule_says(name: str, tmp_path: Path) -> None:
    cb: L.Callback = CALLBACKS[name]()
    callbacks = [cb, SaveParamsPerRank(tmp_path)]
    quiet_trainer(strategy="ddp_spawn", devices=2, max_steps=STEPS, callbacks=callbacks).fit(make(N), loader(n=48))
    rank0, rank1 = load_rank_states(tmp_path)
    assert_states_bitwise_equal(rank0, rank1)
    start = make(N).state_dict()
    trained = {int(k.split(".")[1]) for k in start if k.startswith("blocks.") and not torch.equal(start[k], rank0[k])}
    assert trained == TRAINED[name] and len(trained) >= 2
    assert all(not torch.equal(start[k], rank0[k]) for k in ("stem.weight", "head.weight"))  # DDP's own part
