"""LISA, BAdam and AdaptiveFreezing under DDP (2 gloo processes, different samples per rank): no unused-parameter
error, ranks bit-identical (the same draws and freezes, the units' gradients averaged), and the schedule acted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lit_partial import LISA, AdaptiveFreezing, BAdam, LayerFreezing
from lit_partial.functional.layer_sampling import active_block, sample_layers
from tests.callbacks._stack import loader, make
from tests.helpers import SaveParamsPerRank, assert_states_bitwise_equal, load_rank_states, quiet_trainer

N, STEPS = 4, 6

CALLBACKS: dict[str, Any] = {
    "lisa": lambda: LISA("blocks.*", n_active=1, interval_steps=2, seed=3),
    "badam": lambda: BAdam("blocks.*", switch_every=2, order="ascending"),
    # BAdam's own default: nothing outside the blocks trains, so DDP keeps the blocks (find_unused_parameters)
    "badam_blocks_only": lambda: [LayerFreezing(frozen=["stem", "head"]), BAdam("blocks.*", 2, "ascending")],
    "adaptive_freezing": lambda: AdaptiveFreezing("blocks.*", every_n_steps=1),
}
#: The blocks each schedule trains over the run (AdaptiveFreezing: all, the front ones until they freeze).
TRAINED = {
    "lisa": {i for s in range(0, STEPS, 2) for i in sample_layers(N, 1, 3, s // 2)},
    "badam": {active_block(s, N, 2, "ascending") for s in range(STEPS)},
    "badam_blocks_only": {active_block(s, N, 2, "ascending") for s in range(STEPS)},
    "adaptive_freezing": set(range(N)),
}


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_ddp_ranks_stay_bit_identical_and_train_what_the_schedule_says(name: str, tmp_path: Path) -> None:
    made = CALLBACKS[name]()
    callbacks = [*(made if isinstance(made, list) else [made]), SaveParamsPerRank(tmp_path)]
    # weight decay: a frozen block handed a zero gradient instead of None would decay, and show it
    model = make(N, weight_decay=0.1)
    quiet_trainer(strategy="ddp_spawn", devices=2, max_steps=STEPS, callbacks=callbacks).fit(model, loader(n=48))
    rank0, rank1 = load_rank_states(tmp_path)
    assert_states_bitwise_equal(rank0, rank1)
    start = make(N).state_dict()
    trained = {int(k.split(".")[1]) for k in start if k.startswith("blocks.") and not torch.equal(start[k], rank0[k])}
    assert trained == TRAINED[name] and len(trained) >= 2
    outside_moved = [not torch.equal(start[k], rank0[k]) for k in ("stem.weight", "head.weight")]
    assert outside_moved == [name != "badam_blocks_only"] * 2  # DDP's own part; frozen beside BAdam
