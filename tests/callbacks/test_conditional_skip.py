from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_partial import ConditionalSkip, ConditionError, SelectorError, StochasticDepth
from lit_partial.callbacks.conditional_skip import stochastic_depth_rates
from lit_partial.conditions import Probability, StepContext, uniform_draw
from tests.helpers import RecordGrads, assert_states_bitwise_equal, load_rank_states, quiet_trainer
from tests.helpers.ddp_scripts.dynamic import main
from tests.helpers.models import TinyNet, tiny_loader


def fit(callbacks: list[Callback], steps: int, **kw: Any) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    quiet_trainer(max_steps=steps, callbacks=callbacks, **kw).fit(model, tiny_loader())
    return model


def test_skipped_blocks_equal_a_model_without_them() -> None:
    model = fit([ConditionalSkip({"blocks.[12]": "always"})], steps=5)
    torch.manual_seed(0)
    ref = TinyNet()  # the same initial weights; train it with blocks 1 and 2 left out of forward
    opt = torch.optim.SGD(ref.parameters(), lr=ref.lr)
    batches = list(tiny_loader())
    for step in range(5):
        x, y = batches[step % len(batches)]
        F.mse_loss(ref.head(ref.blocks[0](ref.stem(x))), y).backward()
        opt.step()
        opt.zero_grad()
    assert_states_bitwise_equal(model.state_dict(), ref.state_dict())


class SkipProbe(TinyNet):
    """Checks in every training step that the blocks are skipped, and between steps that they run."""

    checks: list[str]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        with torch.no_grad():
            plain = self.head(self.stem(x))
        assert torch.equal(self(x), plain)
        self.checks = [*getattr(self, "checks", []), "skipped"]
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self) -> None:  # no training step running: validation, test, predict, plain calls
        x = torch.randn(3, 4)
        with torch.no_grad():
            assert torch.equal(self(x), self.head(self.blocks(self.stem(x))))
        self.checks = [*self.checks, "ran"]


def test_skip_only_in_training_steps_and_teardown_restores_forward() -> None:
    torch.manual_seed(0)
    model = SkipProbe()
    quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[ConditionalSkip({"blocks.*": "always"})]).fit(
        model, tiny_loader()
    )
    assert model.checks == ["skipped", "skipped", "ran"]
    assert all("forward" not in block.__dict__ for block in model.blocks)


def test_validation_runs_every_block_and_logging() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    skip = ConditionalSkip({"blocks.1": {"every_n_steps": 2}})
    trainer = quiet_trainer(max_epochs=1, callbacks=[skip])
    trainer.fit(model, tiny_loader(), tiny_loader())
    x, y = tiny_data_tensors()
    with torch.no_grad():
        expected = torch.stack([F.mse_loss(model(x[i : i + 8]), y[i : i + 8]) for i in range(0, 32, 8)]).mean()
    assert torch.allclose(trainer.callback_metrics["val_loss"], expected, rtol=1e-6, atol=0)
    assert trainer.callback_metrics["conditional_skip/blocks.1"].item() == 0.5
    assert skip.totals["blocks.1"] == [2.0, 4.0]


def tiny_data_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    data = tiny_loader().dataset
    return data.tensors  # type: ignore[attr-defined]


def test_stochastic_depth_linear_rates_and_draws() -> None:
    assert stochastic_depth_rates(3, 0.6) == pytest.approx([0.2, 0.4, 0.6])
    record = RecordGrads()
    depth = StochasticDepth(blocks="blocks.*", drop_rate=0.6, seed=5)
    fit([depth, record], steps=8)
    rates = stochastic_depth_rates(3, 0.6)
    for step, none in enumerate(record.no_grad):
        for i in range(3):
            skipped = uniform_draw(5, f"blocks.{i}", step, step % 4) < rates[i]
            assert (f"blocks.{i}.fc1.weight" in none) == skipped, (step, i)
    assert depth.expected_executed_fraction() == pytest.approx(0.6)
    assert set(depth.fractions()) == {"blocks.0", "blocks.1", "blocks.2"}


def test_per_sample_skip_matches_reference_rows() -> None:
    record = RecordGrads()
    fit([ConditionalSkip({"blocks.0": {"when": {"probability": 0.5, "seed": 1}, "per_sample": True}}), record], 1)
    mask = Probability(0.5, 1).per_sample(StepContext(), 8, salt="blocks.0")
    assert 0 < int(mask.sum()) < 8
    torch.manual_seed(0)
    ref = TinyNet()
    x, y = next(iter(tiny_loader()))
    h = ref.stem(x)
    h = torch.where(mask[:, None], h, ref.blocks[0](h))
    F.mse_loss(ref.head(ref.blocks[2](ref.blocks[1](h))), y).backward()
    for name, p in ref.named_parameters():
        assert torch.equal(record.grads[0][name], p.grad), name


def test_resume_with_stochastic_depth_is_exact(tmp_path: Path) -> None:
    def callbacks() -> list[Callback]:
        per_row = {"when": {"probability": 0.5}, "per_sample": True}
        return [StochasticDepth(blocks="blocks.[01]", drop_rate=0.5, seed=2), ConditionalSkip({"blocks.2": per_row})]

    torch.manual_seed(0)
    full = TinyNet()
    quiet_trainer(max_epochs=2, callbacks=callbacks()).fit(full, tiny_loader())
    torch.manual_seed(0)
    first, model = quiet_trainer(max_epochs=1, callbacks=callbacks()), TinyNet()
    first.fit(model, tiny_loader())
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed, cbs = TinyNet(), callbacks()
    quiet_trainer(max_epochs=2, callbacks=cbs).fit(resumed, tiny_loader(), ckpt_path=tmp_path / "half.ckpt")
    assert_states_bitwise_equal(full.state_dict(), resumed.state_dict())
    assert sum(total for _, total in cbs[0].totals.values()) == 16  # 2 blocks x 8 steps, counters resumed
    # ...and the techniques acted: blocks were dropped, so the run differs from plain training of the same seed.
    assert 0 < sum(skipped for skipped, _ in cbs[0].totals.values()) < 16
    torch.manual_seed(0)
    plain = TinyNet()
    quiet_trainer(max_epochs=2).fit(plain, tiny_loader())
    assert any(not torch.equal(plain.state_dict()[k], v) for k, v in full.state_dict().items())


def test_shape_changing_module_is_named_before_training() -> None:
    with pytest.raises(RuntimeError, match=r"cannot skip module 'stem': its output \(8, 8\) differs from its input"):
        fit([ConditionalSkip({"stem": {"steps": [5, 6]}})], steps=1)


class TwoInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class PairModel(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.pair = TwoInputs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        return self.head(self.pair(h, h))


def test_module_with_two_inputs_returns_its_first_input_when_skipped() -> None:
    torch.manual_seed(0)
    model = PairModel()
    quiet_trainer(max_steps=3, callbacks=[ConditionalSkip({"pair": "always"})]).fit(model, tiny_loader())
    torch.manual_seed(0)
    ref = PairModel()  # the same initial weights, trained with `pair` left out of forward by hand
    opt = torch.optim.SGD(ref.parameters(), lr=ref.lr)
    for x, y in list(tiny_loader())[:3]:
        F.mse_loss(ref.head(ref.stem(x)), y).backward()
        opt.step()
        opt.zero_grad()
    assert_states_bitwise_equal(model.state_dict(), ref.state_dict())


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: ConditionalSkip({}), ValueError, "non-empty dict"),
        (lambda: ConditionalSkip({"blocks.*": {"when": "always", "grad_scale": 0.5}}), ValueError, "unknown key"),
        (lambda: ConditionalSkip({"blocks.*": {"probability": -0.1}}), ConditionError, r"in \[0, 1\]"),
        (lambda: ConditionalSkip({"blocks.*": "sometimes"}), ConditionError, "Valid forms"),
        (lambda: StochasticDepth(drop_rate=1.5), ValueError, r"`drop_rate` must be a number in \[0, 1\], got 1.5"),
        (lambda: StochasticDepth(drop_rate="high"), ValueError, "`drop_rate` must be a number"),
        (lambda: StochasticDepth(seed=-1), ValueError, "`seed` must be a non-negative integer"),
        (lambda: StochasticDepth(blocks=[]), SelectorError, "empty list"),
        (
            lambda: StochasticDepth(drop_warmup=1.0),
            ValueError,
            r"`drop_warmup` must be a fraction of training in \[0, 1\)",
        ),
        (lambda: StochasticDepth(drop_warmup=-0.1), ValueError, r"`drop_warmup` must be a fraction .*got -0\.1"),
        (lambda: StochasticDepth(drop_warmup="10%"), ValueError, r"`drop_warmup` must be a fraction .*got '10%'"),
        (
            lambda: StochasticDepth(drop_distribution="quadratic"),
            ValueError,
            r"`drop_distribution` must be one of \['linear', 'uniform'\], got 'quadratic'",
        ),
    ],
)
def test_invalid_arguments_fail_in_init(make: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    ("callback", "match"),
    [
        (ConditionalSkip({"blockz.*": "always"}), "matched no module"),
        (ConditionalSkip({"gate:features": "always"}), "rules name modules"),
        (ConditionalSkip({"features": "always"}), "matched no module"),  # gates are not skippable
        (StochasticDepth(blocks="layers.*"), "matched no module"),
    ],
)
def test_unknown_modules_fail_at_setup(callback: Callback, match: str) -> None:
    with pytest.raises(SelectorError, match=match):
        fit([callback], steps=1)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_spawn_every_rule_type_ranks_bitwise_equal(tmp_path: Path) -> None:
    main(tmp_path, strategy="ddp_spawn", max_steps=6)
    rank0, rank1 = load_rank_states(tmp_path)
    assert_states_bitwise_equal(rank0, rank1)
    frac = [json.loads((tmp_path / f"fractions{r}.json").read_text()) for r in range(2)]
    assert frac[0]["StochasticDepth"] == frac[1]["StochasticDepth"]
    assert frac[0]["ConditionalDetach"]["stem"] != frac[1]["ConditionalDetach"]["stem"]
