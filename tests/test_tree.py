from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict, namedtuple
from typing import Any

import pytest
import torch

from lit_partial import tree
from lit_partial.errors import UnsupportedBatchError, UnsupportedStructureError
from lit_partial.tbptt import detach_hiddens, truncated_bptt

State = namedtuple("State", "h c")


@dataclasses.dataclass
class Memory:
    h: torch.Tensor
    steps: int = 0


@dataclasses.dataclass(frozen=True)
class FrozenMemory:
    h: torch.Tensor


class Cache:
    """A user's cache object: tensors kept as attributes (like a Hugging Face Cache)."""

    def __init__(self, keys: list[torch.Tensor]) -> None:
        self.keys = keys
        self.length = len(keys)


class Opaque:
    def __init__(self, h: torch.Tensor) -> None:
        self.h = h


def attached(shape: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    return torch.ones(shape, requires_grad=True) * 2  # has a grad_fn: part of a graph


def test_map_tensors_rebuilds_every_container_with_its_type() -> None:
    value = {
        "tuple": (attached(), None),
        "named": State(attached(), attached()),
        "list": [attached(), "text", 3],
        "ordered": OrderedDict(a=attached()),
        "default": defaultdict(list, b=attached()),
        "dataclass": Memory(attached(), steps=4),
    }
    out = tree.detach(value)
    assert type(out["named"]) is State and type(out["ordered"]) is OrderedDict
    assert type(out["default"]) is defaultdict and out["default"].default_factory is list
    assert type(out["dataclass"]) is Memory and out["dataclass"].steps == 4
    assert out["list"][1:] == ["text", 3] and out["tuple"][1] is None
    assert all(not t.requires_grad for t in tree.leaves(out))
    assert len(tree.leaves(out)) == 7
    assert all(t.requires_grad for t in tree.leaves(value))  # the input is untouched


def test_registered_tensor_holders_are_copied_not_modified() -> None:
    tree.register_tensor_holder(Cache)
    cache = Cache([attached(), attached()])
    out = tree.detach({"cache": cache})["cache"]
    assert type(out) is Cache and out is not cache and out.length == 2
    assert not any(k.requires_grad for k in out.keys) and all(k.requires_grad for k in cache.keys)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (Opaque(torch.ones(1)), r"type tests\.test_tree\.Opaque at value.*register_tensor_holder\(Opaque\)"),
        ([1, (2, Opaque(torch.ones(1)))], r"at value\[1\]\[1\]"),
        (FrozenMemory(torch.ones(1)), "frozen dataclass"),
    ],
)
def test_unsupported_objects_are_errors_naming_them(value: Any, match: str) -> None:
    with pytest.raises(UnsupportedStructureError, match=match):
        tree.detach(value)


def test_plain_leaves_are_refused_where_every_leaf_must_be_a_tensor() -> None:
    with pytest.raises(UnsupportedBatchError, match=r"type builtins\.str at batch\['text'\]\[0\]"):
        tree.map_tensors(
            {"x": torch.ones(1), "text": ["a"]}, lambda t: t, plain="error", what="batch", error=UnsupportedBatchError
        )


def test_rebuild_and_first_tensor() -> None:
    value = (torch.tensor([1]), {"h": torch.tensor([0.5]), "c": torch.tensor([2.0])})
    assert tree.first_tensor(value).tolist() == [0.5]
    assert tree.first_tensor(value, floating=False).tolist() == [1]
    out = tree.rebuild(value, [t * 10 for t in tree.leaves(value)])
    assert out[1]["c"].tolist() == [20.0]
    with pytest.raises(UnsupportedStructureError, match="2 tensors given, but it holds more"):
        tree.rebuild(value, [torch.zeros(1)] * 2)
    with pytest.raises(UnsupportedStructureError, match="4 tensors given for 3 leaves"):
        tree.rebuild(value, [torch.zeros(1)] * 4)


# ------------------------------------------------------------------------------ recurrent state between TBPTT chunks
@pytest.mark.parametrize("kind", ["tensor", "tuple", "namedtuple", "dataclass", "holder", "dict"])
def test_every_supported_recurrent_state_is_detached_between_chunks(kind: str) -> None:
    tree.register_tensor_holder(Cache)
    cell = torch.nn.RNNCell(3, 4)

    def wrap(h: torch.Tensor) -> Any:
        return {
            "tensor": h,
            "tuple": (h, h),
            "namedtuple": State(h, h),
            "dataclass": Memory(h),
            "holder": Cache([h]),
            "dict": {"h": h},
        }[kind]

    def unwrap(state: Any) -> torch.Tensor | None:
        if state is None:
            return None
        return tree.leaves(state)[0]

    def step(chunk: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        h = unwrap(state)
        for t in range(chunk.shape[1]):
            h = cell(chunk[:, t], h)
        return h.pow(2).mean(), wrap(h)

    x = torch.randn(2, 6, 3)
    # Without the detach, the second chunk's backward would reach the first chunk's freed graph and fail.
    loss, state = truncated_bptt(x, 2, step)
    assert loss is not None and not unwrap(state).requires_grad
    assert type(detach_hiddens(wrap(attached((2, 4))))) is type(wrap(attached((2, 4))))


def test_an_unsupported_recurrent_state_is_an_error_naming_it() -> None:
    def step(chunk: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        return chunk.sum() * torch.ones((), requires_grad=True), Opaque(chunk)

    with pytest.raises(UnsupportedStructureError, match=r"tests\.test_tree\.Opaque"):
        truncated_bptt(torch.randn(2, 4, 3), 2, step)
