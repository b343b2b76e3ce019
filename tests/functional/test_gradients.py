from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lit_partial.functional import detach_if, reverse_grad, scale_grad, skip_rows, straight_through


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (fn(x) * torch.arange(1.0, x.numel() + 1).view_as(x)).sum().backward()
    return x.grad


def test_scale_grad_multiplies_gradient_and_keeps_forward() -> None:
    x = torch.randn(3, 4)
    weights = torch.arange(1.0, 13).view(3, 4)  # d/dx sum(w * x) = w
    assert torch.equal(scale_grad(x, 0.25), x)
    assert torch.equal(_grad(lambda t: scale_grad(t, 0.25), x), 0.25 * weights)
    assert torch.equal(_grad(lambda t: scale_grad(t, 0.0), x), torch.zeros(3, 4))
    assert torch.equal(_grad(lambda t: reverse_grad(t), x), -weights)
    assert torch.equal(_grad(lambda t: reverse_grad(t, 0.5), x), -0.5 * weights)


def test_scale_grad_per_row_and_structures() -> None:
    x = torch.randn(3, 2)
    rows = torch.tensor([1.0, 0.0, -2.0])
    weights = torch.arange(1.0, 7).view(3, 2)
    assert torch.equal(_grad(lambda t: scale_grad(t, rows), x), weights * rows[:, None])
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    out = scale_grad({"a": a, "pair": (b, torch.tensor([1, 2]))}, 3.0)
    (out["a"].sum() + out["pair"][0].sum()).backward()
    assert torch.equal(a.grad, torch.full((2,), 3.0)) and torch.equal(b.grad, torch.full((2,), 3.0))
    assert out["pair"][1].dtype == torch.int64  # non-float leaves pass through


def test_scale_grad_output_may_be_modified_in_place() -> None:
    x = torch.randn(4, requires_grad=True)
    y = nn.ReLU(inplace=True)(scale_grad(x * 1.0, 0.5))
    y.sum().backward()
    assert torch.equal(x.grad, 0.5 * (x > 0).float())


@pytest.mark.parametrize("bad", [math.inf, math.nan, "1", True])
def test_scale_grad_rejects_non_finite(bad) -> None:
    with pytest.raises(ValueError, match="must be a finite number"):
        scale_grad(torch.ones(1), bad)


def test_scale_grad_row_mismatch_names_shapes() -> None:
    x = torch.ones(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"mask of 2 rows cannot apply to a tensor of shape \(3, 2\)"):
        scale_grad(x, torch.ones(2)).sum().backward()


def test_detach_if_whole_and_per_row() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert detach_if(x, False) is x
    assert not detach_if(x, True).requires_grad
    mask = torch.tensor([True, False, True])
    out = detach_if(x, mask)
    assert torch.equal(out, x)
    (out * 2).sum().backward()
    assert torch.equal(x.grad, torch.tensor([[0.0, 0.0], [2.0, 2.0], [0.0, 0.0]]))
    # tuples and dicts of tensors
    a, b = torch.ones(2, 1, requires_grad=True), torch.ones(2, 1, requires_grad=True)
    out = detach_if((a, {"b": b}), torch.tensor([False, True]))
    (out[0].sum() + out[1]["b"].sum()).backward()
    assert a.grad.flatten().tolist() == [1.0, 0.0] and b.grad.flatten().tolist() == [1.0, 0.0]


def test_detach_if_rejects_non_bool_mask() -> None:
    with pytest.raises(ValueError, match="1-D bool tensor"):
        detach_if(torch.ones(2), torch.ones(2))


def test_straight_through_rounding_hand_checked() -> None:
    soft = torch.tensor([0.2, 1.6, -0.7], requires_grad=True)
    out = straight_through(soft.round(), soft)
    assert torch.equal(out, torch.tensor([0.0, 2.0, -1.0]))
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(soft.grad, torch.tensor([1.0, 2.0, 3.0]))  # identity backward through round


def test_straight_through_one_hot_uses_softmax_gradient() -> None:
    logits = torch.tensor([[0.5, 2.0, -1.0]], requires_grad=True)
    probs = logits.softmax(-1)
    hard = nn.functional.one_hot(probs.argmax(-1), 3)  # int64: cast to the soft dtype
    out = straight_through(hard, probs)
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([[0.0, 1.0, 0.0]]))
    w = torch.tensor([[1.0, -2.0, 0.5]])
    (out * w).sum().backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    (ref_logits.softmax(-1) * w).sum().backward()
    assert torch.equal(logits.grad, ref_logits.grad)


def test_straight_through_forward_is_exactly_hard() -> None:
    soft = torch.randn(1000, requires_grad=True) * 1e4
    hard = (soft * 3.3).round() / 3.3
    assert torch.equal(straight_through(hard, soft), hard)


def test_straight_through_errors() -> None:
    with pytest.raises(ValueError, match=r"same shape, got \(2,\) and \(3,\)"):
        straight_through(torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="`soft` must be a floating-point tensor"):
        straight_through(torch.ones(2), torch.ones(2, dtype=torch.int64))


def test_skip_rows_takes_input_rows() -> None:
    x = torch.zeros(3, 2, requires_grad=True)
    w = torch.ones(3, 2, requires_grad=True)
    out = skip_rows((x,), (x + w,), torch.tensor([True, False, True]))[0]
    assert out[:, 0].tolist() == [0.0, 1.0, 0.0]
    out.sum().backward()
    assert w.grad[:, 0].tolist() == [0.0, 1.0, 0.0] and x.grad[:, 0].tolist() == [1.0, 1.0, 1.0]
