"""Every pair of callbacks on one model, acting on the same module where both apply.

Each pair trains two steps and is torn down; then (1) every module is exactly as it was before fit (no
``forward`` instance attribute, no hook, no extra ``__dict__`` entry) and (2) the parameters equal, bit for
bit, a plain PyTorch loop that does by hand what both callbacks do. Checkpointing and the monitor change no
bit, so (3) they must be seen acting: backward recomputes exactly the checkpointed block's layers on the steps
it reaches the block, and the monitor logs the bytes the reference's graph keeps, measured by hand.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from lit_partial import (
    ActivationDetach,
    ActivationMemoryMonitor,
    ConditionalDetach,
    ConditionalSkip,
    GradientMasking,
    LayerFreezing,
    PartialBackpropMixin,
    SelectiveBackprop,
)
from lit_partial.demos.models import FFNBlock
from lit_partial.functional import SavedTensorTracker, build_random_mask, select_topk
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.helpers.acted import RecomputeRecorder, inner_modules

MASKED = "blocks.1.fc1.weight"

TECHNIQUES: dict[str, Callable[[], Callback]] = {
    "freeze": lambda: LayerFreezing(frozen="blocks.1"),
    "mask": lambda: GradientMasking({MASKED: {"kind": "random", "keep": 0.5, "seed": 0}}),
    "detach": lambda: ConditionalDetach({"blocks.1": {"every_n_steps": 2}}),  # steps 0, 2, ...
    "skip": lambda: ConditionalSkip({"blocks.1": {"every_n_steps": 2, "offset": 1}}),  # steps 1, 3, ...
    "checkpoint": lambda: ActivationDetach(checkpoint="blocks.1"),
    "monitor": lambda: ActivationMemoryMonitor(),
    "select": lambda: SelectiveBackprop(keep=0.5, method="topk"),
}
PAIRS = list(itertools.combinations(TECHNIQUES, 2))


class Net(PartialBackpropMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.Sequential(*(FFNBlock(8) for _ in range(3)))
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))

    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return (self(x) - y).pow(2).mean(1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.partial_param_groups(lr=0.1, momentum=0.9))


def batches() -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def loader() -> DataLoader:
    x = torch.cat([b[0] for b in batches()])
    y = torch.cat([b[1] for b in batches()])
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def reference(names: set[str], saved_bytes: list[int] | None = None) -> Net:
    """A plain PyTorch loop doing by hand what the named techniques do; ``saved_bytes`` gets each step's graph size."""
    model = Net()
    if "freeze" in names:
        model.blocks[1].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weight = model.get_parameter(MASKED)
    keep = build_random_mask(weight.shape, 0.5, 0, MASKED)
    for step, (x, y) in enumerate(batches()):
        x, y = x.clone(), y.clone()  # own storages, as the loader's batches have (saved bytes count whole storages)
        if "select" in names:
            model.eval()
            with torch.no_grad():
                index = select_topk((model(x) - y).pow(2).mean(1), 0.5)
            model.train()
            x, y = x[index], y[index]
        with SavedTensorTracker(exclude=[model]) as tracker:
            h = model.blocks[0](model.stem(x))
            if not ("skip" in names and step % 2 == 1):
                h = checkpoint(model.blocks[1], h, use_reentrant=False) if "checkpoint" in names else model.blocks[1](h)
            h = h.detach() if "detach" in names and step % 2 == 0 else h
            loss = (model.head(model.blocks[2](h)) - y).pow(2).mean(1).mean()
        if saved_bytes is not None:
            saved_bytes.append(tracker.live_bytes())
        opt.zero_grad()
        loss.backward()
        before = weight.detach().clone()
        if "mask" in names and weight.grad is not None:
            weight.grad = torch.where(keep, weight.grad, torch.zeros_like(weight.grad))
        opt.step()
        if "mask" in names:
            with torch.no_grad():
                weight.copy_(torch.where(keep, weight, before))
    return model


def footprint(model: nn.Module) -> dict[str, Any]:
    """What an attachment could leave behind on each submodule (the LightningModule's own state aside)."""
    prints = {}
    for name, m in model.named_modules():
        hooks = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        keys = {k for k in m.__dict__ if k.startswith("_lit_partial") or k == "forward"}
        prints[name] = (sorted(m.__dict__) if name else keys, hooks)
    return prints


def fit_and_compare(names: tuple[str, ...]) -> None:
    """Train with the named callbacks, check the unwinding, the reference, and that the no-op-looking ones acted."""
    model = Net()
    before = footprint(model)
    callbacks = {n: TECHNIQUES[n]() for n in names}
    recomputed = RecomputeRecorder()
    quiet_trainer(max_steps=2, callbacks=[*callbacks.values(), recomputed]).fit(model, loader())
    after = footprint(model)
    after[""] = (before[""][0], after[""][1])  # Lightning itself adds attributes to the LightningModule
    assert after == before, f"{names} left something attached"
    saved_bytes: list[int] = []
    assert_states_bitwise_equal(model.state_dict(), reference(set(names), saved_bytes).state_dict())
    # Backward reaches blocks.1 unless it was skipped (odd steps) or its output detached (even steps).
    reached = [not ("skip" in names and step % 2 == 1) and not ("detach" in names and step % 2 == 0) for step in (0, 1)]
    layers = inner_modules(model, ["blocks.1"]) if "checkpoint" in names else set()
    assert recomputed.per_backward == [layers if r else set() for r in reached], "checkpointing did not act as expected"
    if "monitor" in names:
        monitor = callbacks["monitor"]
        assert isinstance(monitor, ActivationMemoryMonitor)
        assert list(monitor.history) == saved_bytes, "the monitor did not log the bytes counted by hand"


@pytest.mark.parametrize("names", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_pair_composes_matches_reference_and_unwinds(names: tuple[str, str]) -> None:
    fit_and_compare(names)


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_each_technique_alone_matches_its_reference(name: str) -> None:
    fit_and_compare((name,))


def test_reference_differs_from_plain_training_for_every_technique_that_changes_training() -> None:
    plain = reference(set()).state_dict()
    for name in ("freeze", "mask", "detach", "skip", "select"):
        assert any(not torch.equal(v, plain[k]) for k, v in reference({name}).state_dict().items()), name
