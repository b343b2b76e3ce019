"""AdaptiveFreezing against AutoFreeze's rule written into a plain PyTorch loop, bit for bit, and its resume."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_partial import AdaptiveFreezing
from lit_partial.errors import ConfigurationError
from lit_partial.functional.adaptive_freezing import freeze_start
from tests.callbacks._stack import LR, assert_bitwise, loader, make
from tests.helpers import quiet_trainer

N, EVERY, STEPS = 4, 2, 15


def autofreeze_loop(model: nn.Module, steps: int, every: int, q: float = 50) -> tuple[nn.Module, list[tuple[int, int]]]:
    """AutoFreeze by hand: gradients summed per interval, L1 norms per layer, the rule, freeze the prefix."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    blocks: Any = model.blocks
    sums = {id(p): torch.zeros_like(p) for p in blocks.parameters()}
    start, previous, history = 0, None, []
    batches = iter(loader())
    for step in range(steps):
        if step > 0 and step % every == 0:
            current = [sum(torch.norm(sums[id(p)], p=1).item() for p in b.parameters()) for b in blocks]
            for s in sums.values():
                s.zero_()
            if previous is not None:
                new = freeze_start(previous, current, start, q)
                for i in range(start, new):
                    for p in blocks[i].parameters():
                        p.requires_grad_(False)
                        p.grad = None
                        opt.state.pop(p, None)
                if new > start:
                    history.append((step, new))
                start = new
            previous = current
        x, y = next(batches)
        F.mse_loss(model(x), y).backward()
        for p in blocks.parameters():
            if p.grad is not None:
                sums[id(p)] += p.grad
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, history


def test_freezes_at_the_steps_of_the_rule_and_trains_bit_for_bit_like_the_loop() -> None:
    model = make(N)
    want, history = autofreeze_loop(model, STEPS, EVERY)
    cb = AdaptiveFreezing("blocks.*", EVERY)
    quiet_trainer(max_steps=STEPS, callbacks=[cb]).fit(model, loader())
    assert history, "the rule froze nothing in this run: the test would prove little"
    assert cb.history == history
    assert_bitwise(model, want)


def test_resume_mid_interval_is_bit_identical(tmp_path: Path) -> None:
    def run(max_epochs: int, ckpt: Path | None = None) -> Any:
        model, cb = make(N), AdaptiveFreezing("blocks.*", EVERY)
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[cb])
        trainer.fit(model, loader(n=12), ckpt_path=ckpt)  # 3 steps per epoch: step 3 is inside an interval
        return trainer, model, cb

    _, full, full_cb = run(5)
    trainer, _, _ = run(1)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed, cb = run(5, tmp_path / "mid.ckpt")
    assert full_cb.history and cb.history == full_cb.history
    assert_bitwise(resumed, full)


def test_frozen_layers_give_up_their_optimizer_state() -> None:
    model = make(N)
    cb = AdaptiveFreezing("blocks.*", EVERY)
    trainer = quiet_trainer(max_steps=STEPS, callbacks=[cb])
    trainer.fit(model, loader())
    state = trainer.optimizers[0].state
    assert cb.start > 0
    assert all(p not in state for b in model.blocks[: cb.start] for p in b.parameters())
    assert all(p in state for b in model.blocks[cb.start :] for p in b.parameters())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, r"`every_n_steps` is 0; expected an integer >= 1"),
        ({"percentile": 101}, r"`percentile` is 101; expected a number from 0 to 100"),
        ({"percentile": "50"}, r"`percentile` is '50'"),
        ({"reset_optimizer_state": None}, r"`reset_optimizer_state` is None"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        AdaptiveFreezing("blocks.*", **kwargs)
