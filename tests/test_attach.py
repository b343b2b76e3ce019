from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

from lit_partial.attach import (
    Handle,
    Handles,
    batch_transforms,
    gate_functions,
    register_batch_transform,
    register_gate,
    watch_gates,
    wrap_forward,
)
from lit_partial.errors import UsageError


def snapshot(module: nn.Module) -> dict[str, Any]:
    """Everything an attachment could leave behind on a module."""
    return {
        "dict": dict(module.__dict__),
        "hooks": (len(module._forward_hooks), len(module._forward_pre_hooks)),
    }


def tag(label: str) -> Any:
    def wrapper(forward: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([forward(x), torch.tensor([float(label)])])

    return wrapper


@pytest.mark.parametrize("removal", list(itertools.permutations(range(3))))
def test_wrappers_compose_and_unwind_in_any_removal_order(removal: tuple[int, ...]) -> None:
    module = nn.Identity()
    before = snapshot(module)
    handles = [
        wrap_forward(module, tag("1")),
        wrap_forward(module, tag("9"), outer=True),
        wrap_forward(module, tag("2")),
    ]
    # ordinary wrappers in registration order, then the outer one around them all
    assert module(torch.tensor([0.0])).tolist() == [0.0, 1.0, 2.0, 9.0]
    remaining = {0: "1", 1: "9", 2: "2"}
    for index in removal:
        handles[index].remove()
        del remaining[index]
        expected = [0.0] + [float(remaining[i]) for i in (0, 2) if i in remaining] + ([9.0] if 1 in remaining else [])
        assert module(torch.tensor([0.0])).tolist() == expected
    assert snapshot(module) == before


def test_a_module_with_its_own_forward_gets_it_back() -> None:
    module = nn.Identity()
    own = lambda x: x + 1  # noqa: E731 - an instance-level forward, as some libraries install
    module.forward = own  # type: ignore[method-assign]
    handle = wrap_forward(module, lambda forward, x: forward(x) * 10)
    assert module(torch.tensor(1.0)).item() == 20.0
    handle.remove()
    assert module.__dict__["forward"] is own


def test_a_forward_replaced_by_someone_else_meanwhile_is_left_alone() -> None:
    module = nn.Identity()
    handle = wrap_forward(module, lambda forward, x: forward(x))
    theirs = lambda x: x  # noqa: E731
    module.forward = theirs  # type: ignore[method-assign]
    handle.remove()
    assert module.__dict__["forward"] is theirs


def test_handles_remove_last_first_and_twice_is_harmless() -> None:
    order: list[int] = []
    handles = Handles()
    for i in range(3):
        handles.add(Handle(lambda i=i: order.append(i)))
    handles.remove()
    handles.remove()
    assert order == [2, 1, 0] and len(handles) == 0


def test_gates_and_transforms_leave_no_trace_once_removed() -> None:
    model = nn.Linear(1, 1)
    before = snapshot(model)
    g1 = register_gate(model, "features", lambda x: x * 2)
    g2 = register_gate(model, "features", lambda x: x + 1)
    seen: set[str] = set()
    watch = watch_gates(model, seen)
    assert [fn(1) for fn in gate_functions(model, "features")] == [2, 2]
    watch.remove()
    g2.remove()
    g1.remove()
    assert gate_functions(model, "features") == () and snapshot(model) == before


def test_batch_transforms_need_the_mixin_and_unwind() -> None:
    with pytest.raises(UsageError, match=r"PartialBackpropMixin"):
        register_batch_transform(nn.Linear(1, 1), lambda b, i: b)
    from tests.helpers.models import TinyNet as Net

    net = Net()
    handle = register_batch_transform(net, lambda b, i: b)
    assert len(batch_transforms(net)) == 1
    handle.remove()
    assert batch_transforms(net) == () and not any(k.startswith("_lit_partial") for k in net.__dict__)


def test_gate_names_must_be_non_empty_strings() -> None:
    with pytest.raises(UsageError, match="a gate name must be a non-empty string, got ''"):
        register_gate(nn.Linear(1, 1), "", lambda x: x)
