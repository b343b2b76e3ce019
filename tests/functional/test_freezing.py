from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_partial.demos.models import DigitsCNN, ResidualFFN
from lit_partial.functional import (
    count_flops,
    freeze,
    frozen_parameter_names,
    hold_norm_statistics,
    trainable_parameter_count,
    unfreeze,
)


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_freeze_sets_requires_grad_false_drops_grad_and_holds_bn() -> None:
    model = _net()
    model(torch.randn(4, 6)).sum().backward()
    frozen = freeze(model[:2])
    assert len(frozen) == 4
    assert frozen_parameter_names(model) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    assert model[3].weight.grad is not None  # untouched
    assert not model[1].training
    assert trainable_parameter_count(model) == 8 * 3 + 3


def test_freeze_with_train_bn_keeps_norm_layers_learning() -> None:
    model = _net()
    freeze(model[:2], train_bn=True)
    assert frozen_parameter_names(model) == ["0.weight", "0.bias"]
    assert model[1].training


def test_unfreeze_restores_training_and_norm_mode() -> None:
    model = _net()
    freeze(model)
    unfreeze(model[:2])
    assert frozen_parameter_names(model) == ["3.weight", "3.bias"]
    assert model[1].training


def test_hold_norm_statistics_survives_model_train_and_keeps_running_stats() -> None:
    model = _net()
    freeze(model[:2])
    before = model[1].running_mean.clone(), model[1].running_var.clone()
    model.train()  # what Lightning does at epoch starts
    assert hold_norm_statistics(model[:2]) == 1
    model(torch.randn(16, 6))
    assert torch.equal(model[1].running_mean, before[0]) and torch.equal(model[1].running_var, before[1])


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda ps: torch.optim.Adam(ps, lr=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.5),
    ],
    ids=["sgd_momentum", "adam", "adamw_wd"],
)
def test_frozen_parameters_bit_identical_under_stateful_optimizers(make_opt) -> None:
    model = _net()
    opt = make_opt(model.parameters())
    x = torch.randn(8, 6)
    for _ in range(2):  # build momentum / Adam moments first: the hard case
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    freeze(model[0])
    snapshot = [p.detach().clone() for p in model[0].parameters()]
    head_before = model[3].weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(snapshot, model[0].parameters(), strict=True))
    assert not torch.equal(head_before, model[3].weight)  # the rest did train


def test_zeroed_gradient_is_not_frozen_reference() -> None:
    # Why freeze() drops .grad: a zero gradient still lets momentum move the parameter.
    layer = nn.Linear(3, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(2, 3)).sum().backward()
    opt.step()
    before = layer.weight.detach().clone()
    layer.weight.grad.zero_()
    opt.step()
    assert not torch.equal(before, layer.weight)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_flop_ratio_of_freezing_k_of_n_blocks(k: int) -> None:
    n, width = 6, 16
    x = torch.randn(8, width)

    def step_flops(frozen_blocks: int, input_grad: bool = False) -> int:
        torch.manual_seed(0)
        model = ResidualFFN(num_blocks=n, width=width)
        for i in range(frozen_blocks):
            freeze(model.blocks[i])
        inp = x.clone().requires_grad_(input_grad)
        return count_flops(lambda: model(inp).sum().backward())

    block_forward = count_flops(lambda: ResidualFFN(1, width)(x))
    full = step_flops(0, input_grad=True)  # every block trained and differentiated: 3 N F
    assert full == 3 * n * block_forward
    # The frozen prefix costs its forward only: exactly 2F saved per frozen block, 1 - 2k/(3N) of a full step.
    assert (full - 2 * k * block_forward) * 3 * n == full * (3 * n - 2 * k)
    assert step_flops(0) - step_flops(k) == 2 * k * block_forward
    # Measured against the same model whose input needs no gradient (block 0 skips its fc1 input grad, F/2):
    assert step_flops(k) / step_flops(0) == pytest.approx(1 - 2 * k / (3 * n - 0.5), abs=1e-12)


def test_frozen_bn_in_eval_skips_backward_through_the_prefix() -> None:
    x = torch.randn(4, 1, 8, 8)

    def step_flops(train_bn: bool) -> int:
        model = DigitsCNN()
        freeze(model.backbone, train_bn=train_bn)
        model.train()
        if not train_bn:
            hold_norm_statistics(model.backbone)
        return count_flops(lambda: model(x).sum().backward())

    head_only = DigitsCNN()
    head_forward = count_flops(lambda: head_only(x))
    # train_bn=False: backward touches the head only; train_bn=True must backprop through every conv.
    assert step_flops(False) < step_flops(True)
    assert step_flops(False) - head_forward < head_forward * 0.01
