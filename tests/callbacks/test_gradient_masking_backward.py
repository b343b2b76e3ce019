"""GradientMasking with gradients masked in the backward (the default) against masking at the step.

``mask_in_backward=False`` is the step-time path that ``test_gradient_masking.py`` checks against hand-written
PyTorch loops (and those tests now run the default path too); here both paths must give the same parameters bit
for bit under every optimizer, accumulation, clipping, NaN/inf, bf16 autocast, writes to gradients after the
backward and ``torch.compile``, and the new path must run the masking kernels the counted number of times.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_partial import GradientMasking
from lit_partial.errors import UsageError
from tests.callbacks.test_gradient_masking import KEEP, OPTIMIZERS, Tiny, assert_masked_unchanged, bits, loader
from tests.functional.test_masking_backward import CountMaskKernels
from tests.helpers import quiet_trainer

MASKS: dict[str, Any] = {"net.0.weight": KEEP["net.0.weight"], "net.2": {"kind": "rows", "index": [1]}}
POISON = torch.tensor([math.nan, math.inf, -math.inf, -0.0]).repeat(8).view(8, 4)


def fit(
    name: str,
    strict: bool,
    in_backward: bool,
    extra: list[Callback] | None = None,
    compile_net: bool = False,
    **kw: Any,
) -> tuple[Tiny, GradientMasking]:
    opt, kwargs = OPTIMIZERS[name]
    model = Tiny(opt, **kwargs)
    keep = KEEP["net.0.weight"]
    model.net[0].weight.register_hook(lambda g: torch.where(keep, g, POISON))  # masked entries: NaN/inf/-0.0
    if compile_net:
        model.net.compile(backend="aot_eager")
    cb = GradientMasking(MASKS, strict=strict, mask_in_backward=in_backward)
    trainer = quiet_trainer(callbacks=[cb, *(extra or [])], max_epochs=2, accumulate_grad_batches=2, **kw)
    trainer.fit(model, loader())
    return model, cb


def assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(bits(pa), bits(pb)), name


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_in_backward_equals_at_step_bit_for_bit(name: str, strict: bool) -> None:
    """Every optimizer, accumulate 2, clipping (the masked norm), NaN/inf/-0.0 in masked gradients."""
    before = Tiny(OPTIMIZERS[name][0], **OPTIMIZERS[name][1])
    hot, cb = fit(name, strict, True, gradient_clip_val=0.05)
    cold, _ = fit(name, strict, False, gradient_clip_val=0.05)
    assert_same_parameters(hot, cold)
    assert all(torch.isfinite(p).all() for p in hot.parameters())
    if strict:
        assert_masked_unchanged(hot, dict(before.named_parameters()), cb)


class WriteGradients(Callback):
    """Writes NaN into every gradient after the backward, in place (after the hooks masked it)."""

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            pl_module.net[0].weight.grad.add_(torch.where(KEEP["net.0.weight"], 0.0, math.nan))


def test_gradients_written_after_the_backward_are_masked_again_at_the_step() -> None:
    before = Tiny("adamw", weight_decay=0.5)
    hot, cb = fit("adamw", True, True, extra=[WriteGradients()])
    cold, _ = fit("adamw", True, False, extra=[WriteGradients()])
    assert_same_parameters(hot, cold)
    assert all(torch.isfinite(p).all() for p in hot.parameters())
    assert_masked_unchanged(hot, dict(before.named_parameters()), cb)


def test_bf16_autocast_and_compile_equal_the_step_time_path() -> None:
    hot, _ = fit("adamw", True, True, precision="bf16-mixed", gradient_clip_val=1.0)
    cold, _ = fit("adamw", True, False, precision="bf16-mixed", gradient_clip_val=1.0)
    assert_same_parameters(hot, cold)
    hot_c, _ = fit("sgd_momentum_nesterov_wd", True, True, compile_net=True)
    cold_c, _ = fit("sgd_momentum_nesterov_wd", True, False, compile_net=True)
    eager, _ = fit("sgd_momentum_nesterov_wd", True, False)
    assert_same_parameters(hot_c, cold_c)
    assert_same_parameters(hot_c, eager)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("in_backward", [True, False])
def test_masking_kernels_counted_per_micro_batch_and_step(in_backward: bool, strict: bool) -> None:
    """8 micro-batches, 4 optimizer steps, 3 masked tensors: net.0.weight (8, 4) with a full mask, net.2.weight
    (2, 8) with a rows mask kept in broadcast shape (2, 1), net.2.bias (2,).

    In the backward: one select per masked tensor per micro-batch, none at the step. At the step: one foreach
    select per optimizer step. Strict with a static mask: one snapshot per tensor (the first step), then one
    restore per tensor per step. Bytes: every tensor each kernel reads and writes: int32 views of the float32
    tensors; masks as int8 views of the bools, or (strict on CPU) int32 masks made once.
    """
    counter = CountMaskKernels()
    with counter:
        fit("adamw", strict, in_backward)
    shapes = [(32, 32), (16, 2), (2, 2)]  # (elements, mask elements) per masked tensor
    mask = 4 if strict else 1
    select = sum(2 * 4 * n + mask * m for n, m in shapes)  # grad read + written, mask read
    restore = sum(3 * 4 * n + mask * m for n, m in shapes)  # param and buffer read, param written, mask read
    snapshot = sum(2 * 4 * n + m for n, m in shapes)  # param read, buffer written, its frozen mask (int8) read
    assert (select, restore, snapshot) == ((544, 744, 436) if strict else (436, 636, 436))
    calls = {"mul": 3 * 8} if in_backward else {"_foreach_mul_": 4}
    if strict:
        calls = {**calls, "mul": calls.get("mul", 0) + 3, "addcmul": 3 * 4}
    assert counter.calls == calls
    selects = 8 if in_backward else 4
    assert counter.bytes == selects * select + (4 * restore + snapshot if strict else 0)


def test_mask_in_backward_must_be_a_bool() -> None:
    with pytest.raises(UsageError, match="`mask_in_backward` must be True or False, got 'yes'"):
        GradientMasking(MASKS, mask_in_backward="yes")  # type: ignore[arg-type]


def test_teardown_removes_the_backward_hooks() -> None:
    model, _ = fit("adamw", False, True)
    model.zero_grad(set_to_none=True)
    x, y = next(iter(loader()))
    model.training_step((x, y), 0).backward()  # the poison hook is the model's own: masked entries get NaN/inf
    assert torch.isnan(model.net[0].weight.grad[~KEEP["net.0.weight"]]).any()  # nothing masks them any more
