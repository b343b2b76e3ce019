"""Drop-rate warm-up (composer's ``drop_warmup``) and drop distributions of StochasticDepth, ConditionalSkip and
ConditionalDetach, against hand-computed ramps and composer's formulas."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_partial import ConditionalDetach, ConditionalSkip, StochasticDepth
from lit_partial.callbacks.conditional_skip import stochastic_depth_rates
from lit_partial.conditions import Probability, StepContext, uniform_draw
from lit_partial.errors import ConfigurationError
from tests.helpers import RecordGrads, assert_states_bitwise_equal, quiet_trainer
from tests.helpers.models import TinyNet, tiny_loader

BATCHES = 4  # tiny_loader(): 32 samples in batches of 8


def fit(callbacks: list[Callback], steps: int) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    quiet_trainer(max_steps=steps, callbacks=callbacks).fit(model, tiny_loader())
    return model


def composer_rate(
    drop_rate: float, distribution: str, block: int, blocks: int, step: int, total: int, warmup: float
) -> float:
    """composer.algorithms.StochasticDepth: the rate warms up over ``warmup`` of the duration, then per block."""
    elapsed = step / total
    current = drop_rate * (elapsed / warmup if warmup and elapsed < warmup else 1.0)
    return current * (block + 1) / blocks if distribution == "linear" else current


@pytest.mark.parametrize("distribution", ["linear", "uniform"])
def test_block_rates_follow_composers_formulas_at_every_step(distribution: str) -> None:
    assert stochastic_depth_rates(5, 0.4, "linear") == pytest.approx([0.08, 0.16, 0.24, 0.32, 0.4])
    assert stochastic_depth_rates(5, 0.4, "uniform") == [0.4] * 5
    depth = StochasticDepth("blocks.*", drop_rate=0.6, drop_warmup=0.25, drop_distribution=distribution)
    fit([depth], steps=20)
    assert depth.warmup_steps == 5  # a quarter of the 20 optimizer steps
    for step in range(25):
        conditions = [rule.condition for rule in depth.rules.values()]
        got = [c.rate(StepContext(global_step=step)) for c in conditions if isinstance(c, Probability)]
        want = [composer_rate(0.6, distribution, i, 3, step, 20, 0.25) for i in range(3)]
        assert got == pytest.approx(want), step


@pytest.mark.parametrize("distribution", ["linear", "uniform"])
def test_stochastic_depth_skips_per_step_what_the_hand_computed_ramp_says(distribution: str) -> None:
    record = RecordGrads()
    depth = StochasticDepth("blocks.*", drop_rate=0.9, seed=5, drop_warmup=0.5, drop_distribution=distribution)
    fit([depth, record], steps=16)  # warm-up over 8 steps
    rates = stochastic_depth_rates(3, 0.9, distribution)
    executed = []
    for step, no_grad in enumerate(record.no_grad):
        ramp = min(1.0, step / 8)
        skipped = [uniform_draw(5, f"blocks.{i}", step, step % BATCHES) < rates[i] * ramp for i in range(3)]
        assert [f"blocks.{i}.fc1.weight" in no_grad for i in range(3)] == skipped, step  # skipped: no gradient
        executed.append(3 - sum(skipped))
    assert executed[0] == 3  # nothing is dropped at step 0
    assert sum(executed[:8]) > sum(executed[8:])  # the warm-up drops less than the rest of training
    hits, total = (sum(v) for v in zip(*depth.totals.values(), strict=True))
    assert (hits, total) == (48 - sum(executed), 48)


def test_conditional_skip_and_detach_take_warmup_steps_in_the_condition() -> None:
    record = RecordGrads()
    skip = ConditionalSkip({"blocks.1": {"probability": 1.0, "warmup_steps": 6, "seed": 2}})
    detach = ConditionalDetach({"stem": {"probability": 1.0, "warmup_steps": 4, "seed": 1}})
    fit([skip, detach, record], steps=10)
    for step, no_grad in enumerate(record.no_grad):
        assert ("blocks.1.fc1.weight" in no_grad) == (uniform_draw(2, "blocks.1", step, step % BATCHES) < step / 6)
        assert ("stem.weight" in no_grad) == (uniform_draw(1, "stem", step, step % BATCHES) < step / 4), step
    assert "stem.weight" not in record.no_grad[0] and all("stem.weight" in n for n in record.no_grad[4:])


class StopAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


def test_a_resume_in_the_middle_of_the_warmup_is_exact(tmp_path: Path) -> None:
    def depth() -> StochasticDepth:
        return StochasticDepth("blocks.*", drop_rate=0.8, seed=3, drop_warmup=0.5, drop_distribution="uniform")

    torch.manual_seed(0)
    full = TinyNet()
    quiet_trainer(max_epochs=4, callbacks=[depth()]).fit(full, tiny_loader())  # 16 steps, warm-up over 8
    torch.manual_seed(0)
    first, model = quiet_trainer(max_epochs=4, callbacks=[depth(), StopAfterFirstEpoch()]), TinyNet()
    first.fit(model, tiny_loader())  # the warm-up is a fraction of the configured run, so configure the same one
    assert first.global_step == 4
    first.save_checkpoint(tmp_path / "warming.ckpt")  # after step 4 of the 8 warm-up steps
    resumed, cb = TinyNet(), depth()
    quiet_trainer(max_epochs=4, callbacks=[cb]).fit(resumed, tiny_loader(), ckpt_path=tmp_path / "warming.ckpt")
    assert cb.warmup_steps == 8
    assert_states_bitwise_equal(full.state_dict(), resumed.state_dict())


def test_a_warmup_fraction_of_a_run_without_an_end_fails_at_setup() -> None:
    model = TinyNet()
    with pytest.raises(ConfigurationError, match=r"drop_warmup=0.1\) is a fraction of training, and this run has no"):
        quiet_trainer(max_epochs=-1, callbacks=[StochasticDepth(drop_warmup=0.1)]).fit(model, tiny_loader())
    assert model.global_step == 0


def test_the_configuration_is_every_option_and_the_legacy_one_shows_the_new_options_only_where_set() -> None:
    # checkpoints made before drop_warmup / drop_distribution existed recorded (and keyed) the legacy form
    plain = {"blocks": ["blocks.*"], "drop_rate": 0.1, "seed": 0, "per_sample": False}
    assert StochasticDepth().config() == {**plain, "drop_warmup": 0.0, "drop_distribution": "linear"}
    assert StochasticDepth().legacy_config() == plain
    options = {"drop_warmup": 0.1, "drop_distribution": "uniform"}
    assert StochasticDepth(**options).config() == StochasticDepth(**options).legacy_config() == {**plain, **options}
