"""detach_outputs / checkpoint_modules / offload_modules against hand-written references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lit_partial.demos import DigitsCNN, ResidualFFN
from lit_partial.functional import (
    SavedTensorTracker,
    UnsafeCheckpointError,
    checkpoint_modules,
    detach_outputs,
    offload_modules,
    saved_activation_bytes,
)
from lit_partial.selectors import SelectorError
from tests.helpers.acted import below, modules_called

B, W, N = 4, 16, 8
UNIT = B * W * 4  # bytes of one (B, W) float32 activation


def _grads(model: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _same(a: list[Tensor | None], b: list[Tensor | None]) -> bool:
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in zip(a, b, strict=True)
    )


def test_detach_equals_hand_written_detach_bytes_and_gradients() -> None:
    model, x = ResidualFFN(N, W), torch.randn(B, W)
    hand = saved_activation_bytes(lambda: model.blocks[4:](model.blocks[:4](x).detach()).sum(), exclude=model)
    model.blocks[4:](model.blocks[:4](x).detach()).sum().backward()
    hand_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    handle = detach_outputs(model, "blocks.3")
    assert saved_activation_bytes(lambda: model(x).sum(), exclude=model) == hand == N * UNIT
    model(x).sum().backward()
    assert _same(_grads(model), hand_grads)
    assert model.blocks[0].fc1.weight.grad is None
    handle.remove()
    assert not model.blocks[3]._forward_hooks


def test_detach_when_predicate_and_tuple_outputs() -> None:
    class Pair(nn.Module):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x * 2, x * 3

    model = nn.Sequential(nn.Linear(2, 2), Pair())
    decisions = iter([False, True])
    handle = detach_outputs(model, "1", when=lambda name, out: next(decisions))
    x = torch.randn(1, 2)
    assert all(t.requires_grad for t in model(x))
    assert not any(t.requires_grad for t in model(x))
    handle.remove()


@pytest.mark.parametrize(
    ("selector", "segments", "kept_units"), [("blocks.*", None, N), ("blocks", 3, 3), ("blocks", "sqrt", 3)]
)
def test_checkpoint_gradients_equal_and_bytes_drop(selector: str, segments: int | str | None, kept_units: int) -> None:
    model, x = ResidualFFN(N, W), torch.randn(B, W)
    assert saved_activation_bytes(lambda: model(x).sum(), exclude=model) == 2 * N * UNIT  # input + ReLU output
    model(x).sum().backward()
    plain = _grads(model)
    model.zero_grad()
    handle = checkpoint_modules(model, selector, segments=segments)
    # only each checkpointed piece's input stays
    assert saved_activation_bytes(lambda: model(x).sum(), exclude=model) == kept_units * UNIT
    model(x).sum().backward()
    assert _same(_grads(model), plain)
    handle.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_checkpoint_preserves_dropout_and_updates_batchnorm_once() -> None:
    plain = DigitsCNN(dropout=0.5)
    ckpt = copy.deepcopy(plain)
    x = torch.randn(8, 1, 8, 8)
    torch.manual_seed(1)
    with modules_called(plain) as forward, SavedTensorTracker(exclude=[plain]) as plain_saved:
        loss = plain(x).sum()
    plain_bytes = plain_saved.live_bytes()
    loss.backward()
    checkpointed = ["backbone.0", "backbone.1", "backbone.2", "head"]
    handle = checkpoint_modules(ckpt, checkpointed)
    torch.manual_seed(1)
    with SavedTensorTracker(exclude=[ckpt]) as ckpt_saved:
        loss = ckpt(x).sum()
    assert ckpt_saved.live_bytes() < plain_bytes  # it acted: less kept, and backward recomputes the blocks' layers
    with modules_called(ckpt) as recomputed:
        loss.backward()
    assert recomputed == below(forward, checkpointed) != set()
    handle.remove()
    assert _same(_grads(ckpt), _grads(plain))
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name} differs: running statistics updated twice?"
    assert int(ckpt.backbone[0][1].num_batches_tracked) == 1


def test_checkpoint_of_inplace_module_raises_naming_it() -> None:
    class AddInPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            x += self.fc(x)
            return x

    model = nn.Sequential(nn.Linear(3, 3), AddInPlace())
    handle = checkpoint_modules(model, "1")
    with pytest.raises(UnsafeCheckpointError, match=r"'1' \(AddInPlace\) modified its input in place"):
        model(torch.randn(2, 3))
    handle.remove()


def test_checkpoint_switch_and_no_grad_run_plain_forward() -> None:
    model, x = ResidualFFN(2, W), torch.randn(B, W)
    on = False
    handle = checkpoint_modules(model, "blocks.*", enabled=lambda: on)
    assert saved_activation_bytes(lambda: model(x).sum(), exclude=model) == 2 * 2 * UNIT
    on = True
    assert saved_activation_bytes(lambda: model(x).sum(), exclude=model) == 2 * UNIT
    with torch.no_grad():
        assert not model(x).requires_grad
    handle.remove()


def test_checkpoint_errors() -> None:
    model = ResidualFFN(2, W)
    with pytest.raises(ValueError, match=r"not nn.Sequential: 'blocks.0' \(FFNBlock\)"):
        checkpoint_modules(model, "blocks.*", segments=2)
    with pytest.raises(SelectorError, match="did you mean"):
        checkpoint_modules(model, "block.0")


def test_nested_patches_restore_in_order() -> None:
    model, x = ResidualFFN(2, W), torch.randn(B, W)
    reference = model(x)
    first = checkpoint_modules(model, ["blocks.0", "blocks.0.fc1"])  # nested: only the outer one is patched
    assert "forward" not in model.blocks[0].fc1.__dict__
    second = offload_modules(model, "blocks.0")
    out = model(x)
    assert torch.equal(out, reference)
    with modules_called(model) as recomputed:
        out.sum().backward()
    assert recomputed == {"blocks.0.fc1", "blocks.0.act", "blocks.0.fc2"}  # the checkpoint acted inside the offload
    second.remove()
    first.remove()
    assert "forward" not in model.blocks[0].__dict__


def test_offload_keeps_gradients_and_moves_saved_tensors_off_the_graph_count() -> None:
    model, x = ResidualFFN(2, W), torch.randn(B, W)
    model(x).sum().backward()
    plain = _grads(model)
    model.zero_grad()
    handle = offload_modules(model, "blocks.0")
    assert saved_activation_bytes(lambda: model(x).sum(), exclude=model) == 2 * UNIT  # only block 1 counts
    model(x).sum().backward()
    handle.remove()
    assert _same(_grads(model), plain)
