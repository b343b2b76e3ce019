"""A torchvision-style ResNet (BasicBlock + BatchNorm, built in tests/helpers/resnet.py): freezing and checkpointing
blocks equal plain PyTorch doing the same by hand, BatchNorm statistics included (skipping: test_skip_structures).
Checkpointing changes no bit, so its test also checks that it acted: recomputation and fewer saved bytes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lit_partial import ActivationDetach, ActivationMemoryMonitor, LayerFreezing
from lit_partial.functional import SavedTensorTracker
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.helpers.acted import RecomputeRecorder, inner_modules
from tests.helpers.resnet import ResNetModule, image_loader

STEPS = 4


def fit(callbacks: list[Callback]) -> ResNetModule:
    torch.manual_seed(0)
    model = ResNetModule(dropout=0.2)
    quiet_trainer(max_steps=STEPS, callbacks=callbacks).fit(model, image_loader())
    return model


def hand_written(frozen_stage: str | None = None, saved_bytes: list[int] | None = None) -> ResNetModule:
    """Plain PyTorch; ``saved_bytes`` receives what each step's graph keeps for backward."""
    torch.manual_seed(0)
    ref = ResNetModule(dropout=0.2)
    if frozen_stage:
        getattr(ref.net, frozen_stage).requires_grad_(False)
    opt = torch.optim.SGD(ref.parameters(), lr=ref.lr)
    for x, y in image_loader():
        ref.train()
        if frozen_stage:  # frozen BatchNorm keeps its running statistics: eval mode, as LayerFreezing holds it
            for m in getattr(ref.net, frozen_stage).modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.eval()
        with SavedTensorTracker(exclude=[ref]) as tracker:
            loss = F.cross_entropy(ref.net(x), y)
        if saved_bytes is not None:
            saved_bytes.append(tracker.live_bytes())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return ref


def test_frozen_stage_equals_requires_grad_false_with_batchnorm_held() -> None:
    model = fit([LayerFreezing(frozen="net.layer1")])
    assert_states_bitwise_equal(model.state_dict(), hand_written("layer1").state_dict())


def test_checkpointed_blocks_change_no_bit_batchnorm_statistics_included() -> None:
    blocks = ["net.layer1.0", "net.layer1.1", "net.layer2.0"]
    recomputed, monitor, plain_bytes = RecomputeRecorder(), ActivationMemoryMonitor(), list[int]()
    model = fit([ActivationDetach(checkpoint=blocks), recomputed, monitor])
    assert_states_bitwise_equal(model.state_dict(), hand_written(saved_bytes=plain_bytes).state_dict())
    # it acted: every backward ran the blocks' layers again, and kept less than plain PyTorch
    assert recomputed.per_backward == [inner_modules(model, blocks)] * STEPS
    assert all(ours < plain for ours, plain in zip(monitor.history, plain_bytes, strict=True)), (
        monitor.history,
        plain_bytes,
    )
