"""saved_activation_bytes / SavedTensorTracker against counts computed by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_partial.functional import SavedTensorTracker, saved_activation_bytes

F32 = 4


def test_mlp_counts_input_and_hidden_once() -> None:
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(6, 5)
    # Linear 0 keeps x (weight grad); ReLU keeps its output, which Linear 2 keeps too: one storage.
    expected = 6 * 5 * F32 + 6 * 7 * F32
    assert saved_activation_bytes(lambda: model(x).sum()) == expected


def test_views_of_one_storage_count_once() -> None:
    x = torch.randn(4, 8, requires_grad=True)

    def fn() -> torch.Tensor:
        a = x * 2.0  # mul by a Python scalar keeps nothing
        return (a.sin() + a.view(-1).cos().view(4, 8)).sum()  # sin keeps a, cos keeps a view of a

    assert saved_activation_bytes(fn) == 4 * 8 * F32


def test_parameters_and_excluded_buffers_do_not_count() -> None:
    layer = nn.Linear(3, 4)
    x = torch.randn(2, 3, requires_grad=True)
    # Linear keeps x (for weight.grad) and weight.t() (for x.grad): only x counts
    assert saved_activation_bytes(lambda: layer(x).sum()) == 2 * 3 * F32
    bn = nn.BatchNorm1d(4)
    h = torch.randn(8, 4, requires_grad=True)
    with_buffers = saved_activation_bytes(lambda: bn(h).sum())
    without = saved_activation_bytes(lambda: bn(h).sum(), exclude=bn)
    assert with_buffers - without == 2 * 4 * F32  # running_mean and running_var saved by batch_norm
    assert saved_activation_bytes(lambda: bn(h).sum(), exclude=[bn.running_mean, bn.running_var]) == without


def test_cut_off_graph_is_freed_and_not_counted() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
    x = torch.randn(3, 4)
    full = saved_activation_bytes(lambda: model(x).sum())
    cut = saved_activation_bytes(lambda: model[2:](model[:2](x).detach()).sum())
    assert full == 3 * 3 * 4 * F32  # x, tanh out (kept by tanh and Linear 2), last tanh out
    assert cut == 2 * 3 * 4 * F32  # Linear 2's input and the last tanh output


def test_tracker_counts_live_only_and_leaves_gradients_unchanged() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
    x = torch.randn(5, 4)
    model(x).sum().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with SavedTensorTracker() as tracker:
        loss = model(x).sum()
    assert tracker.live_bytes() == (5 * 4 + 5 * 6) * F32
    assert tracker.live_count() == 3  # x, relu output (twice)
    loss.backward()
    assert tracker.live_bytes() == 0  # backward freed the graph
    assert all(torch.equal(r, p.grad) for r, p in zip(reference, model.parameters(), strict=True))


def test_inplace_change_of_saved_tensor_still_raises() -> None:
    x = torch.randn(3, requires_grad=True)
    with SavedTensorTracker():
        y = (x * 2).exp()  # exp keeps its output
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_tracker_cannot_be_entered_twice() -> None:
    tracker = SavedTensorTracker()
    with tracker, pytest.raises(RuntimeError, match="already active"), tracker:
        pass
    assert not tracker.active


def test_nested_trackers_each_count_what_is_saved_inside_them() -> None:
    layer = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with SavedTensorTracker() as reference:
        alone = layer(x).relu().sum()
    expected = reference.live_bytes()  # the input of the Linear and the output of the ReLU: 48 bytes
    with SavedTensorTracker(exclude=layer) as outer:
        with SavedTensorTracker(exclude=layer) as inner:
            out = layer(x).relu().sum()
        assert inner.live_bytes() == outer.live_bytes() == expected == 48
        after = layer(torch.randn(2, 3)).relu().sum()  # the inner one has closed: only the outer one counts this
        assert outer.live_bytes() == 2 * expected and inner.live_bytes() == expected
    del out, after, alone
    assert outer.live_bytes() == inner.live_bytes() == 0


def test_trackers_closed_out_of_order_keep_counting_correctly() -> None:
    layer = torch.nn.Linear(3, 3)
    first, second = SavedTensorTracker(), SavedTensorTracker()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # callbacks may close in any order
    out = layer(torch.randn(2, 3)).relu().sum()
    assert (first.live_bytes(), second.live_bytes()) == (0, 48)
    second.__exit__(None, None, None)
    del out
