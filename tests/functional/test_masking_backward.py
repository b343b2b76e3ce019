"""Gradient masks applied in the backward (post-accumulate-grad hooks) and the kernel-form masks.

References: the step-time ``mask_gradients`` with bool masks (itself checked against hand-built tensors in
``test_masking.py``), ``torch.where`` on the same values, and exact counts of the masking kernels' calls and
bytes (by wrapping the torch functions the kernels call), never wall time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lit_partial.errors import UsageError
from lit_partial.functional.backward_masking import mask_gradients_in_backward
from lit_partial.functional.masking import (
    guard_masked_elements,
    kernel_mask,
    mask_gradients,
    restore_masked,
    snapshot_masked,
)

KERNELS = ("mul", "addcmul", "_foreach_mul_")


class CountMaskKernels:
    """Counts calls of the masking kernels (``torch.mul`` / ``addcmul`` / ``_foreach_mul_`` on integer views, which
    only the bit-select kernels use) and the bytes they read and write (each tensor argument read once, ``out=``
    and in-place targets written once), by wrapping those torch functions.

    A context manager; backward hooks included (a ``TorchFunctionMode`` is not active inside ``backward()``).
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes = 0
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> CountMaskKernels:
        for name in KERNELS:
            self._saved[name] = original = getattr(torch, name)
            setattr(torch, name, self._counting(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch, name, original)

    def _counting(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, list) else [a])]
            tensors = [t for t in flat if isinstance(t, Tensor)]
            if any(not (t.is_floating_point() or t.dtype == torch.bool) for t in tensors):
                self.calls[name] = self.calls.get(name, 0) + 1
                self.bytes += sum(t.numel() * t.element_size() for t in tensors)
                if name.endswith("_"):  # in place: the first list is read and written
                    self.bytes += sum(t.numel() * t.element_size() for t in args[0])
            return original(*args, **kwargs)

        return counted


def bits(t: Tensor) -> Tensor:
    return t.detach().view(torch.int32)


def poisoned(shape: tuple[int, ...]) -> Tensor:
    values = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1.5, -2.0])
    return values.repeat(math.prod(shape) // 7 + 1)[: math.prod(shape)].view(shape)


def test_kernel_mask_is_an_int8_view_or_as_wide_as_the_parameter() -> None:
    keep = torch.tensor([[True], [False]])
    narrow = kernel_mask(keep, torch.zeros(2, 3))
    assert narrow.dtype == torch.int8 and narrow.untyped_storage().data_ptr() == keep.untyped_storage().data_ptr()
    for dtype, expected in ((torch.float32, torch.int32), (torch.bfloat16, torch.int16), (torch.float64, torch.int64)):
        k = kernel_mask(keep, torch.zeros(2, 3, dtype=dtype), wide=True)
        assert k.dtype == expected and k.shape == (2, 1)  # broadcast shape kept
        assert k.tolist() == [[1], [0]]
    assert kernel_mask(torch.tensor([0.0, 1.0]), torch.zeros(2)).tolist() == [0, 1]  # 0/1 numbers


def test_kernel_masks_select_the_same_bits_as_bool_masks() -> None:
    keep = torch.rand(6, 7, generator=torch.Generator().manual_seed(0)) < 0.4
    a, b = nn.Parameter(torch.zeros(6, 7)), nn.Parameter(torch.zeros(6, 7))
    a.grad, b.grad = poisoned((6, 7)), poisoned((6, 7))
    mask_gradients([a], [keep])
    mask_gradients([b], [kernel_mask(keep, b, wide=True)])
    assert torch.equal(bits(a.grad), bits(b.grad))
    expected = torch.where(keep, poisoned((6, 7)), torch.zeros(()))
    assert torch.equal(bits(a.grad), bits(expected))  # NaN/inf -> +0.0; kept -0.0 stays -0.0
    # Restore through either form gives the same bits.
    p, q = poisoned((6, 7)), poisoned((6, 7))
    snap = snapshot_masked([p], [keep])
    p.fill_(7.0), q.fill_(7.0)
    restore_masked([p], [keep], snap)
    restore_masked([q], [kernel_mask(keep, q, wide=True)], snap)
    assert torch.equal(bits(p), bits(q))
    assert torch.equal(bits(p), bits(torch.where(keep, torch.full((6, 7), 7.0), poisoned((6, 7)))))


@pytest.mark.parametrize("form", ["bool", "wide"])
def test_guard_with_kernel_masks_keeps_masked_bits_under_adamw(form: str) -> None:
    keep = torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    w = nn.Parameter(poisoned((5, 4)).nan_to_num(0.0) + 1.0)
    before = w.detach().clone()
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.5)
    mask = keep if form == "bool" else kernel_mask(keep, w, wide=True)
    handle = guard_masked_elements(opt, lambda: [(w, mask)])
    for _ in range(3):
        w.grad = torch.ones(5, 4)
        opt.step()
    assert torch.equal(bits(w)[~keep], bits(before)[~keep])
    assert (w[keep] != before[keep]).all()
    handle.remove()
    assert len(handle) == 0


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def test_backward_hooks_equal_step_time_masking_with_accumulation_and_nan() -> None:
    """Two micro-batches with NaN/inf in masked positions: hooks after each == one mask at the end, bit for bit."""
    a, b = net(), net()
    keeps = [
        torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.5 for i, p in enumerate(a[0:1].parameters())
    ]
    poison = torch.where(keeps[0], 0.0, poisoned((6, 4)))
    for m in (a, b):
        m[0].weight.register_hook(lambda g: g + poison)  # before accumulation: masked entries get NaN/inf
    masks = mask_gradients_in_backward([(a[0].weight, keeps[0])])
    counter = CountMaskKernels()
    x = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(2))
    with counter:
        for i in range(2):
            a(x[i]).square().sum().backward()
    for i in range(2):
        b(x[i]).square().sum().backward()
    mask_gradients([b[0].weight], [keeps[0]])
    assert masks.settled(a[0].weight) and masks.passes == 2
    assert counter.calls == {"mul": 2}  # one select per accumulation, nothing else
    assert counter.bytes == 2 * 24 * (4 + 4 + 1)  # grad read and written (int32 view), bool mask read (int8 view)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(bits(pa.grad), bits(pb.grad))


def test_settled_only_while_the_gradient_is_the_masked_tensor_unchanged() -> None:
    m = net()
    w = m[0].weight
    masks = mask_gradients_in_backward([(w, torch.ones(6, 4, dtype=torch.bool))])
    assert not masks.settled(w)  # no backward yet
    m(torch.randn(3, 4)).sum().backward()
    assert masks.settled(w)
    w.grad.add_(0.0)  # written in place (an unscale, an all-reduce, a user's hook)
    assert not masks.settled(w)
    m(torch.randn(3, 4)).sum().backward()  # accumulated again: the hook masked the new sum
    assert masks.settled(w)
    w.grad = w.grad.clone()  # replaced
    assert not masks.settled(w)
    m.zero_grad(set_to_none=True)
    assert not masks.settled(w)
    masks.remove()
    masks.remove()  # twice is harmless
    m(torch.randn(3, 4)).sum().backward()
    assert not masks.settled(w) and masks.passes == 2  # hooks gone


def test_callable_masks_are_read_at_every_hook_call() -> None:
    m = net()
    w = m[0].weight
    current = {"keep": kernel_mask(torch.zeros(6, 4, dtype=torch.bool), w)}
    mask_gradients_in_backward([(w, lambda: current["keep"])])
    m(torch.randn(3, 4)).sum().backward()
    assert (w.grad == 0).all()
    current["keep"] = kernel_mask(torch.ones(6, 4, dtype=torch.bool), w)
    m.zero_grad()
    m(torch.randn(3, 4)).sum().backward()
    assert (w.grad != 0).any()


def test_backward_masking_refuses_a_parameter_without_gradients() -> None:
    w = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(UsageError, match=r"does not require gradients.*Fix: pass only trainable"):
        mask_gradients_in_backward([(w, torch.tensor([True, False]))])
