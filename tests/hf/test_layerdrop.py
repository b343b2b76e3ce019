"""LayerDrop / stochastic depth over Hugging Face layers equals a hand-written loop that leaves the same layers out.

transformers >= 5 layers are called with attention masks, position ids and caches by keyword and return a
tensor (``forward -> torch.Tensor``), so a layer skipped at its very first call returns its input by that
annotation; nothing of a skipped layer runs (no dropout draw), so the runs match bit for bit.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch

from lit_partial import ConditionalSkip, StochasticDepth
from lit_partial.callbacks.conditional_skip import stochastic_depth_rates
from lit_partial.conditions import Probability, StepContext
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.hf._models import FAMILIES, LAYERS, HFModule, build, loader, without_layers

pytestmark = pytest.mark.hf
STEPS = 6


def hand_written(family: str, drop: list[float], seed: int) -> tuple[torch.nn.Module, list[set[int]]]:
    """Plain PyTorch: AdamW, each step leaving out layer i when its draw (seed, name, step) is below drop[i]."""
    torch.manual_seed(0)
    ref = build(family).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    names = [f"model.{LAYERS[family]}.{i}" for i in range(len(drop))]
    pattern = []
    for step, batch in enumerate(loader(family, n=4 * STEPS)):
        ctx = StepContext(global_step=step, batch_idx=step)
        skipped = {i for i, name in enumerate(names) if Probability(drop[i], seed)(ctx, salt=name)}
        pattern.append(skipped)
        with without_layers(ref, family, skipped):
            ref(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return ref, pattern


@pytest.mark.parametrize("family", FAMILIES)
def test_layerdrop_equals_a_hand_written_loop_bit_for_bit(family: str) -> None:
    torch.manual_seed(0)
    model = HFModule(build(family))
    skip = ConditionalSkip({f"model.{LAYERS[family]}.*": {"probability": 0.5, "seed": 3}})
    quiet_trainer(max_steps=STEPS, callbacks=[skip]).fit(model, loader(family, n=4 * STEPS))
    ref, pattern = hand_written(family, [0.5, 0.5], seed=3)
    assert 0 < sum(map(len, pattern)) < 2 * STEPS  # layers were left out on some steps and ran on others
    assert_states_bitwise_equal(model.model.state_dict(), ref.state_dict())
    assert sum(total for _, total in skip.totals.values()) == 2 * STEPS


def test_stochastic_depth_over_llama_layers_equals_a_hand_written_loop() -> None:
    torch.manual_seed(0)
    model = HFModule(build("llama"))
    depth = StochasticDepth(blocks="model.model.layers.*", drop_rate=0.8, seed=1)
    quiet_trainer(max_steps=STEPS, callbacks=[depth]).fit(model, loader("llama", n=4 * STEPS))
    ref, pattern = hand_written("llama", stochastic_depth_rates(2, 0.8), seed=1)
    assert any(pattern)
    assert_states_bitwise_equal(model.model.state_dict(), ref.state_dict())
