"""LISA against the paper's Algorithm 1 written as a plain PyTorch loop with the same draws, bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_partial import LISA
from lit_partial.errors import ConfigurationError
from lit_partial.functional.layer_sampling import optimizer_state_bytes, sample_layers
from lit_partial.selectors import SelectorError
from tests.callbacks._stack import assert_bitwise, loader, make, plain_loop
from tests.helpers import quiet_trainer

N, K, STEPS, SEED = 4, 2, 7, 3  # seed 3 draws layers 0, 2, 1, 0 (with n_active=1): layer 0 comes back


def draws(n_active: int = 1, seed: int = SEED) -> Any:
    return lambda step: sample_layers(N, n_active, seed, step // K)


def not_drawn(step: int, active: list[int]) -> list[int]:
    return [i for i in range(N) if i not in active]


def test_draws_change_over_periods_for_this_seed() -> None:  # else the tests below would prove little
    assert len({tuple(draws()(p * K)) for p in range(STEPS // K + 1)}) >= 3


@pytest.mark.parametrize("n_active", [1, 2])
def test_lisa_equals_algorithm_1_by_hand(n_active: int) -> None:
    model = make(N)
    want = plain_loop(model, loader(), STEPS, draws(n_active), not_drawn, K)
    quiet_trainer(max_steps=STEPS, callbacks=[LISA("blocks.*", n_active, K, SEED)]).fit(model, loader())
    assert_bitwise(model, want)


def test_keeping_optimizer_state_equals_the_loop_that_keeps_it() -> None:  # LMFlow's behaviour, as an option
    model = make(N)
    want = plain_loop(model, loader(), STEPS, draws(), lambda step, active: [], K)
    quiet_trainer(max_steps=STEPS, callbacks=[LISA("blocks.*", 1, K, SEED, reset_optimizer_state=False)]).fit(
        model, loader()
    )
    assert_bitwise(model, want)


def test_switches_happen_at_optimizer_step_boundaries_under_accumulation() -> None:
    model = make(N)
    want = plain_loop(model, loader(), STEPS, draws(), not_drawn, K, accumulate=2)
    trainer = quiet_trainer(max_steps=STEPS, accumulate_grad_batches=2, callbacks=[LISA("blocks.*", 1, K, SEED)])
    trainer.fit(model, loader())
    assert_bitwise(model, want)


def test_layers_frozen_before_the_optimizer_exists_are_still_stepped_when_drawn() -> None:
    # LMFlow #726: the optimizer was built over what required grad after the first freeze, so later draws never moved.
    model = make(N, only_trainable=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quiet_trainer(max_steps=STEPS, callbacks=[LISA("blocks.*", 1, K, SEED)]).fit(model, loader())
    drawn = {i for p in range(0, STEPS, K) for i in draws()(p)}
    changed = {int(n.split(".")[1]) for n, p in model.named_parameters() if n.startswith("blocks.")
               and not torch.equal(p, before[n])}  # fmt: skip
    assert changed == drawn and len(drawn) >= 2


class StateBytes(Callback):
    def __init__(self) -> None:
        self.bytes: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.bytes.append(optimizer_state_bytes(trainer.optimizers[0]))


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_state_stays_at_the_active_layers_unless_kept(reset: bool) -> None:
    model = make(N)
    record = StateBytes()
    quiet_trainer(max_steps=STEPS, callbacks=[LISA("blocks.*", 1, K, SEED, reset_optimizer_state=reset), record]).fit(
        model, loader()
    )

    def adam_bytes(params: Any) -> int:  # two moments of the parameter's size and a 4-byte step
        return sum(2 * p.numel() * p.element_size() + 4 for p in params)

    bound = adam_bytes([*model.stem.parameters(), *model.head.parameters(), *model.blocks[0].parameters()])
    if reset:
        assert max(record.bytes) == bound  # every layer has the same size
    else:  # LMFlow #729: the state of every layer ever drawn stays
        drawn = len({i for p in range(0, STEPS, K) for i in draws()(p)})
        assert record.bytes[-1] == bound + (drawn - 1) * adam_bytes(model.blocks[0].parameters())


@pytest.mark.parametrize(("interval", "switches"), [(2, 5), (3, 3)], ids=["mid_period", "period_boundary"])
def test_resume_is_bit_identical(tmp_path: Path, interval: int, switches: int) -> None:
    full = make(N)
    quiet_trainer(max_epochs=3, callbacks=[LISA("blocks.*", 1, interval, SEED)]).fit(
        full, loader(n=12)
    )  # 3 steps/epoch
    part = make(N)
    trainer = quiet_trainer(max_epochs=1, callbacks=[LISA("blocks.*", 1, interval, SEED)])  # ends after step 3
    trainer.fit(part, loader(n=12))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = make(N)
    cb = LISA("blocks.*", 1, interval, SEED)
    quiet_trainer(max_epochs=3, callbacks=[cb]).fit(resumed, loader(n=12), ckpt_path=tmp_path / "mid.ckpt")
    assert_bitwise(resumed, full)
    assert cb.switches == switches  # periods over steps 0..8, counted across the checkpoint


def test_teardown_gives_every_layer_back_its_requires_grad() -> None:
    model = make(N)
    model.blocks[3].requires_grad_(False)
    quiet_trainer(max_steps=3, callbacks=[LISA("blocks.*", 2, 1)]).fit(model, loader())
    assert [all(p.requires_grad for p in b.parameters()) for b in model.blocks] == [True, True, True, False]


def test_a_different_configuration_is_refused_on_resume(tmp_path: Path) -> None:
    trainer = quiet_trainer(max_steps=2, callbacks=[LISA("blocks.*", 1, K, SEED)])
    trainer.fit(make(N), loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(Exception, match=r"n_active: 1 -> 2"):
        quiet_trainer(max_steps=4, callbacks=[LISA("blocks.*", 2, K)]).fit(
            make(N), loader(), ckpt_path=tmp_path / "a.ckpt"
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_active": 0}, r"`n_active` is 0; expected an integer >= 1"),
        ({"n_active": True}, r"`n_active` is True"),
        ({"interval_steps": 0}, r"`interval_steps` is 0"),
        ({"seed": 1.5}, r"`seed` is 1.5; expected an integer"),
        ({"reset_optimizer_state": "yes"}, r"`reset_optimizer_state` is 'yes'; expected True or False"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        LISA("blocks.*", **kwargs)


def test_bad_layers_selector_is_refused() -> None:
    with pytest.raises(SelectorError, match=r"`layers` is an empty list"):
        LISA([])


@pytest.mark.parametrize(
    ("layers", "n_active", "match"),
    [
        ("blocks.*", 5, r"n_active=5 but `layers`=\['blocks.\*'\] selects only 4 layers"),
        (["blocks", "blocks.0"], 1, r"selects 'blocks' and 'blocks.0' inside it, so units overlap"),
        ("blocks.0.act", 1, r"unit 'blocks.0.act' \(.*\) has no parameters"),
        ("nope.*", 1, r"selector 'nope.\*' matched no module"),
    ],
)
def test_bad_layers_are_refused_at_setup(layers: Any, n_active: int, match: str) -> None:
    with pytest.raises((ConfigurationError, SelectorError), match=match):
        quiet_trainer(max_steps=1, callbacks=[LISA(layers, n_active, 1)]).fit(make(N), loader())


def test_units_sharing_a_parameter_are_refused() -> None:
    model = make(N)
    model.blocks[1].fc1 = model.blocks[0].fc1  # tied
    with pytest.raises(ConfigurationError, match=r"units 'blocks.0' and 'blocks.1' share a parameter"):
        quiet_trainer(max_steps=1, callbacks=[LISA("blocks.*", 1, 1)]).fit(model, loader())
