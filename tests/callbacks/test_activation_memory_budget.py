"""``ActivationDetach(memory_budget=...)``: torch.compile's activation memory budget, only on a compiled model.

With the ``aot_eager_decomp_partition`` backend (AOTAutograd with torch's min-cut partitioner, no code generator)
a budget of 0.0 saves fewer bytes for backward than 1.0 (TinyNet, batch 8: 1920 -> 128 bytes compiled whole,
1920 -> 640 with only ``blocks`` compiled), measured with ``SavedTensorTracker`` around the compiled
forward; parameters after training equal the uncompiled run's bit for bit; torch's setting is restored after ``fit``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lit_partial import ActivationDetach, CheckpointMismatchError, ConfigurationError, _compat
from lit_partial.functional import SavedTensorTracker
from tests.helpers.models import TinyNet, tiny_loader
from tests.helpers.trainers import quiet_trainer

BACKEND = "aot_eager_decomp_partition"  # the partitioner that reads the budget, without a C++ compiler
HOW = ("model.compile()", "torch.compile(model)", "submodule")


class Measured(TinyNet):
    """TinyNet recording, per training step, the bytes its forward saves for backward and torch's budget."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: list[int] = []
        self.budgets: list[float] = []

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        with SavedTensorTracker(exclude=self) as tracker:  # parameters never count
            out = self(x)
            self.saved.append(tracker.live_bytes())
        self.budgets.append(_compat.activation_memory_budget())
        return F.mse_loss(out, y)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    before = _compat.activation_memory_budget()
    yield
    torch._dynamo.reset()
    assert _compat.activation_memory_budget() == before  # every test leaves torch's setting as it found it


def fit(how: str | None, budget: float | None, steps: int = 3, **trainer_kwargs: Any) -> Measured:
    torch.manual_seed(0)
    model = Measured()
    fitted: Any = model
    if how == "model.compile()":
        model.compile(backend=BACKEND)
    elif how == "torch.compile(model)":
        fitted = torch.compile(model, backend=BACKEND)
    elif how == "submodule":
        model.blocks = torch.compile(model.blocks, backend=BACKEND)  # type: ignore[assignment]
    callbacks = [] if budget is None else [ActivationDetach(memory_budget=budget)]
    quiet_trainer(max_steps=steps, callbacks=callbacks, **trainer_kwargs).fit(fitted, tiny_loader())
    torch._dynamo.reset()  # the next run compiles afresh, under its own budget
    return model


def parameters(model: Measured) -> dict[str, Tensor]:
    return {name.replace("_orig_mod.", ""): p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("how", HOW)
def test_a_smaller_budget_saves_fewer_bytes_with_the_uncompiled_models_parameters(how: str) -> None:
    eager = fit(None, None)
    full, least = fit(how, 1.0), fit(how, 0.0)
    assert full.budgets == [1.0] * 3 and least.budgets == [0.0] * 3  # set during the training steps
    assert len(set(full.saved)) == len(set(least.saved)) == 1  # the same every step
    assert least.saved[0] < full.saved[0] <= eager.saved[0]
    reference = parameters(eager)
    for model in (full, least):  # recomputation reruns the same ops: bit-exact (measured with torch 2.13, CPU)
        torch.testing.assert_close(parameters(model), reference, rtol=0, atol=0)


def test_bytes_saved_by_the_whole_compiled_model() -> None:
    # model.compile(): budget 1.0 keeps the matmul inputs/outputs the min-cut keeps; 0.0 keeps only the batch
    # (8 x 4 floats) and recomputes the rest of the forward in backward.
    assert fit("model.compile()", 0.0, steps=1).saved == [8 * 4 * 4]
    assert fit("model.compile()", 1.0, steps=1).saved[0] > 8 * 4 * 4


def test_uncompiled_model_is_refused_and_nothing_is_changed() -> None:
    before = _compat.activation_memory_budget()
    with pytest.raises(ConfigurationError, match=r"memory_budget=0\.5.*Measured is not compiled.*model\.compile\(\)"):
        fit(None, 0.5)
    assert _compat.activation_memory_budget() == before


def test_budget_beside_checkpoint_records_both_in_the_configuration() -> None:
    cb = ActivationDetach(checkpoint="blocks.1", memory_budget=0.25)
    assert cb.config()["memory_budget"] == 0.25 and cb.config()["checkpoint"] == ["blocks.1"]
    assert "memory_budget" not in ActivationDetach(checkpoint="blocks.1").config()  # older checkpoints still match


def test_resume_with_another_budget_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Measured()
    model.compile(backend=BACKEND)
    trainer = quiet_trainer(max_steps=1, callbacks=[ActivationDetach(memory_budget=0.5)])
    trainer.fit(model, tiny_loader())
    path = tmp_path / "budget.ckpt"
    trainer.save_checkpoint(path)
    again = quiet_trainer(max_steps=2, callbacks=[ActivationDetach(memory_budget=0.25)])
    with pytest.raises(CheckpointMismatchError, match=r"ActivationDetach.*memory_budget"):
        again.fit(model, tiny_loader(), ckpt_path=path)


@pytest.mark.parametrize(
    ("budget", "match"),
    [
        ("half", r"`memory_budget` must be a number in \[0, 1\] or None, got 'half'; e\.g\. memory_budget=0\.5"),
        (True, r"`memory_budget` must be a number in \[0, 1\] or None, got True"),
        (1.5, r"`memory_budget` must be in \[0, 1\], got 1\.5: 1\.0 saves every activation.*e\.g\. memory_budget"),
        (-0.1, r"`memory_budget` must be in \[0, 1\], got -0\.1"),
        (math.nan, r"`memory_budget` must be in \[0, 1\], got nan"),
    ],
    ids=["string", "bool", "above", "below", "nan"],
)
def test_invalid_budget_is_refused(budget: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ActivationDetach(memory_budget=budget)


def test_budget_alone_is_enough_and_an_int_is_accepted() -> None:
    assert ActivationDetach(memory_budget=0).memory_budget == 0.0
    with pytest.raises(ConfigurationError, match="at least one of `at`, `checkpoint`, `offload`, `memory_budget`"):
        ActivationDetach()
