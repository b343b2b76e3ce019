"""Selective activation checkpointing: exact gradients, saved bytes between none and full, recompute counts."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lit_partial import ActivationDetach
from lit_partial._compat import is_op, sdpa_ops
from lit_partial.errors import ConfigurationError
from lit_partial.functional import saved_activation_bytes
from lit_partial.functional.activation_cuts import checkpoint_modules
from lit_partial.functional.selective_checkpoint import live_forward_bytes, resolve_policy, selective_context_fn

W, H = 16, 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(W, 3 * W), nn.Linear(W, W)
        self.up, self.down = nn.Linear(W, 2 * W), nn.Linear(2 * W, W)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, H, W // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, W)
        x = x + self.out(a)
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class CountOps(TorchDispatchMode):
    """Counts the ops that run (as kernels reach this mode) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[str(func.overloadpacket).split(".")[-1]] += 1
        return func(*args, **(kwargs or {}))


def setup(policy: Any = "none") -> tuple[Net, Tensor, Any]:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 5, W, requires_grad=True)
    handles = (
        None if policy == "none" else checkpoint_modules(model, "blocks.*", policy=None if policy == "full" else policy)
    )
    return model, x, handles


def grads_and_backward_ops(policy: Any) -> tuple[list[Tensor], Counter[str]]:
    model, x, _ = setup(policy)
    loss = model(x).square().sum()
    with CountOps() as counter:
        loss.backward()
    return [x.grad, *(p.grad for p in model.parameters())], counter.counts  # type: ignore[list-item]


def test_gradients_bit_identical_and_recompute_counts_follow_the_policy() -> None:
    plain, none_ops = grads_and_backward_ops("none")
    for policy in ("full", "matmul"):
        grads, _ = grads_and_backward_ops(policy)
        assert all(torch.equal(a, b) for a, b in zip(plain, grads, strict=True)), policy
    _, full_ops = grads_and_backward_ops("full")
    _, sac_ops = grads_and_backward_ops("matmul")
    model, x, _ = setup("none")
    with CountOps() as forward:
        model(x)
    fwd = forward.counts
    sdpa = next(name for name in fwd if "scaled_dot_product" in name)
    assert fwd["addmm"] + fwd["mm"] == 12 and fwd[sdpa] == 3 and fwd["gelu"] == 3  # 3 blocks: 4 linears, 1 attention
    # Full checkpointing recomputes the attention and the matmuls up to the last one backward needs (torch stops a
    # recomputation early: each block's final linear is not rerun, 3 x 3 addmm); the matmul policy recomputes none.
    assert full_ops[sdpa] == fwd[sdpa] and full_ops["addmm"] == none_ops["addmm"] + 9
    for op in ("addmm", "mm", sdpa):
        assert sac_ops[op] == none_ops[op], op
    # ... but both recompute the pointwise GELU, which plain backward never runs.
    assert none_ops["gelu"] == 0 and full_ops["gelu"] == sac_ops["gelu"] == 3


def saved(policy: Any) -> int:
    model, x, _ = setup(policy)
    return live_forward_bytes(lambda: model(x).square().sum(), exclude=[model, x])


def test_saved_bytes_strictly_between_none_and_full_and_equal_to_the_policy_by_hand() -> None:
    none, full, sac = saved("none"), saved("full"), saved("matmul")
    assert full < sac < none
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 5, W, requires_grad=True)
    packets = [torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm, torch.ops.aten.baddbmm, *sdpa_ops()]
    ops = [getattr(packet, name) for packet in packets for name in packet.overloads()]
    context_fn = functools.partial(create_selective_checkpoint_contexts, ops)

    def by_hand() -> Tensor:
        h = x
        for block in model.blocks:
            h = checkpoint(block, h, use_reentrant=False, context_fn=context_fn)
        return h.square().sum()

    assert live_forward_bytes(by_hand, exclude=[model, x]) == sac
    # autograd's saved-tensor hooks do not see what selective checkpointing caches: they count it as full checkpointing
    torch.manual_seed(0)
    assert saved_activation_bytes(by_hand, exclude=[model]) < sac


def test_op_lists_and_policy_functions() -> None:
    assert saved("none") > saved(["aten.addmm"]) > saved("full")
    assert saved(["aten.addmm"]) == saved([torch.ops.aten.addmm.default])

    def save_nothing(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.PREFER_RECOMPUTE

    assert saved(save_nothing) == saved("full")
    assert resolve_policy(save_nothing) is save_nothing


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        ("fast", r"unknown checkpoint policy 'fast'; presets are \['matmul'\]"),
        (["aten.no_such_op"], r"unknown op 'aten.no_such_op'"),
        (["aten.mm.nope"], r"op 'mm' has no overload 'nope'"),
        ([3], r"a policy op must be an op name like 'aten.mm'"),
        ([], r"a checkpoint policy must be a preset name"),
    ],
)
def test_bad_policies_are_named(policy: Any, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        selective_context_fn(policy)


def test_activation_detach_validates_policy() -> None:
    with pytest.raises(
        ConfigurationError, match=r"`policy='matmul'` chooses what `checkpoint` saves, which is not set"
    ):
        ActivationDetach(at="x", policy="matmul")
    with pytest.raises(ConfigurationError, match=r"unknown op 'aten.nope'"):
        ActivationDetach(checkpoint="blocks.*", policy=["aten.nope"])
    assert ActivationDetach(checkpoint="blocks.*", policy=["mm"]).config()["policy"][0] == "aten.mm.default"
    assert ActivationDetach(checkpoint="blocks.*", policy="matmul").config()["policy"] == "matmul"
    assert "policy" not in ActivationDetach(checkpoint="blocks.*").config()  # older checkpoints still match


def calls_per_block(model: Net) -> tuple[list[int], Callable[[], None]]:
    counts = [0] * len(model.blocks)
    hooks = [
        b.up.register_forward_hook(lambda *a, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, b in enumerate(model.blocks)
    ]
    return counts, lambda: [h.remove() for h in hooks]  # type: ignore[func-returns-value]


def test_frozen_blocks_below_everything_that_trains_are_not_recomputed() -> None:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 5, W)  # the input needs no gradient
    for block in model.blocks[:2]:
        block.requires_grad_(False)
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.blocks[2].parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    handles = checkpoint_modules(model, "blocks.*", policy="matmul")
    counts, remove = calls_per_block(model)
    model(x).square().sum().backward()
    remove()
    handles.remove()
    assert counts == [1, 1, 2]  # only the block that trains runs again in backward
    assert all(torch.equal(a, p.grad) for a, p in zip(expected, model.blocks[2].parameters(), strict=True))


def test_compat_sdpa_ops_cover_what_sdpa_dispatches_to() -> None:
    q = torch.randn(1, 2, 3, 4)
    with CountOps() as counter:
        F.scaled_dot_product_attention(q, q, q)
    names = {str(op).split(".")[-1] for op in sdpa_ops()}
    assert names & set(counter.counts), (names, counter.counts)
    assert all(is_op(op) for op in sdpa_ops()) and is_op(torch.ops.aten.mm) and not is_op(torch.mm)


def test_checkpointed_calls_get_no_kv_cache_as_under_hugging_face_checkpointing() -> None:
    seen: list[tuple[Any, Any]] = []

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x: Tensor, past_key_values: Any = None, use_cache: bool = False) -> Tensor:
            seen.append((past_key_values, use_cache))
            return self.lin(x)  # type: ignore[no-any-return]

    layer, cache = Layer(), object()
    handles = checkpoint_modules(layer, "lin", policy="matmul")  # the inner module: the outer call is untouched
    layer(torch.randn(1, 2), past_key_values=cache, use_cache=True)
    handles.remove()
    outer = nn.Sequential()
    outer.add_module("layer", layer)
    handles = checkpoint_modules(outer, "layer", policy="matmul")
    outer.layer(torch.randn(1, 2), past_key_values=cache, use_cache=True).sum().backward()
    handles.remove()
    assert seen[0] == (cache, True)  # not checkpointed: as called
    assert seen[1:] == [(None, False), (None, False)]  # checkpointed: forward and recomputation without the cache
