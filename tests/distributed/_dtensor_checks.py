"""Checks of the sharded-tensor helpers on 2 CPU processes (gloo), without Lightning.

Run as a script (``python tests/distributed/_dtensor_checks.py``); it spawns 2 processes, each runs every
check and prints ``ok <name>``; any failure exits non-zero naming the check. ``tests/distributed/test_dtensor.py``
runs it in a subprocess with a timeout.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_partial.conditions import STATISTICS, Condition, StepContext, parse_condition
from lit_partial.distributed import (
    full_tensor,
    gather_objects,
    global_statistic,
    holds_on_all_ranks,
    local_tensor,
    shard_like,
)
from lit_partial.functional.masking import count_masked, guard_masked_elements, mask_gradients

WORLD = 2


def check_shard_like_follows_the_parameter_layout(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    for shape in [(10, 6), (7, 3), (1, 4)]:  # even, uneven and a shard that is empty on rank 1
        param = distribute_tensor(torch.randn(shape, generator=torch.Generator().manual_seed(0)), mesh, [Shard(0)])
        gen = torch.Generator().manual_seed(1)
        masks = {
            "full": torch.rand(shape, generator=gen) > 0.5,
            "rows": torch.rand(shape[0], 1, generator=gen) > 0.5,
            "columns": torch.rand(1, shape[1], generator=gen) > 0.5,
            "last_dim": torch.rand(shape[1], generator=gen) > 0.5,
            "scalar": torch.tensor(False),
        }
        for kind, mask in masks.items():
            sharded = shard_like(mask, param)
            assert torch.equal(full_tensor(sharded), mask), (shape, kind)
            local_mask, local_param = local_tensor(sharded), local_tensor(param)
            assert torch.broadcast_shapes(local_mask.shape, local_param.shape) == local_param.shape, (shape, kind)
            expected = [Shard(0)] if kind in ("full", "rows") and shape[0] > 1 else [Replicate()]
            assert list(sharded.placements) == expected, (shape, kind, sharded.placements)  # type: ignore[attr-defined]
            # The local mask selects exactly the elements of the full mask that this rank's shard holds.
            full_local = torch.chunk(mask.expand(shape), WORLD, dim=0)
            mine = full_local[rank] if rank < len(full_local) else mask.expand(shape)[:0]
            assert torch.equal(local_mask.expand_as(local_param), mine), (shape, kind)
        # Without communication, every rank shards its own copy (identical by construction here).
        assert torch.equal(full_tensor(shard_like(masks["full"], param, src_data_rank=None)), masks["full"])
    # Rank 0's mask wins when ranks built different ones (as DDP broadcasts rank 0's).
    param = distribute_tensor(torch.zeros(4, 2), mesh, [Shard(0)])
    assert torch.equal(
        full_tensor(shard_like(torch.full((4, 2), rank == 0), param)), torch.ones(4, 2, dtype=torch.bool)
    )


def check_masking_kernels_on_shards_match_the_unsharded_run_bit_for_bit(rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(9, 5, generator=gen)
    mask = torch.rand(9, 1, generator=gen) > 0.4  # rows, kept in broadcast shape
    grads = [torch.randn(9, 5, generator=gen) for _ in range(4)]
    for g in grads:
        g[~mask.expand_as(g)] = float("nan")  # NaN in masked positions must become exactly 0

    def train(sharded: bool) -> torch.Tensor:
        data = distribute_tensor(init.clone(), mesh, [Shard(0)]) if sharded else init.clone()
        param = torch.nn.Parameter(data)
        m = shard_like(mask, param) if sharded else mask
        opt = torch.optim.AdamW([param], lr=0.1, weight_decay=0.5)
        handle = guard_masked_elements(opt, lambda: [(param, m)])
        for g in grads:
            param.grad = distribute_tensor(g.clone(), mesh, [Shard(0)]) if sharded else g.clone()
            mask_gradients([param], [m])
            assert not local_tensor(param.grad).isnan().any()
            opt.step()
        handle.remove()
        assert count_masked(param, m) == count_masked(init, mask)
        return full_tensor(param.detach())

    sharded, plain = train(True), train(False)
    assert torch.equal(sharded, plain), (sharded - plain).abs().max()
    frozen = ~mask.expand_as(init)
    assert torch.equal(sharded[frozen], init[frozen]) and not torch.equal(sharded[~frozen], init[~frozen])


def check_global_statistics_equal_those_of_the_concatenated_tensors(rank: int) -> None:
    gen = torch.Generator().manual_seed(3)
    parts = [torch.randn(5, 3, generator=gen) + 2.0, torch.randn(3, 3, generator=gen) - 2.0]
    whole = torch.cat(parts).double()
    for stat in STATISTICS:
        got = global_statistic(stat, parts[rank])
        expected = STATISTICS[stat](whole, None)
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12), (stat, got, expected)
        values = gather_objects(float(got))
        assert values[0] == values[1], (stat, values)
    empty = torch.empty(0) if rank == 1 else parts[0]  # a rank may hold no elements
    assert global_statistic("max", empty) == parts[0].double().max()


class _PerRank(Condition):
    """An activation condition lit_partial does not know: holds on rank 0 only."""

    needs_activation = True

    def __call__(self, ctx: StepContext, x: torch.Tensor | None = None, *, salt: str = "") -> bool:
        return dist.get_rank() == 0


def check_decisions_are_taken_once_for_all_ranks(rank: int) -> None:
    ctx = StepContext(epoch=0, global_step=3, sharded=True)
    x = torch.full((4, 2), 1.0 if rank == 0 else -3.0)  # mean over both ranks: -1
    cases: dict[str, tuple[Any, bool]] = {
        "local mean would split the ranks": ({"stat": "mean", "op": ">", "value": 0.0}, False),
        "max over both ranks": ({"stat": "max", "op": ">", "value": 0.5}, True),
        "all of a global statistic and a step window": (
            {"all": [{"stat": "min", "op": "<", "value": -2.0}, {"steps": [0, 5]}]},
            True,
        ),
        "any short-circuits the same way on every rank": (
            {"any": [{"steps": [0, 5]}, {"stat": "mean", "op": ">", "value": 0.0}]},
            True,
        ),
        "probability draws agree by construction": ({"probability": 0.5, "seed": 7}, None),  # type: ignore[dict-item]
    }
    for name, (spec, expected) in cases.items():
        got = holds_on_all_ranks(parse_condition(spec), ctx, x, salt="blocks.0")
        assert len(set(gather_objects(got))) == 1, name
        assert expected is None or got is expected, (name, got)
    assert holds_on_all_ranks(_PerRank(), ctx, x) is True  # unknown per-rank conditions: holds if it holds anywhere


CHECKS = [
    check_shard_like_follows_the_parameter_layout,
    check_masking_kernels_on_shards_match_the_unsharded_run_bit_for_bit,
    check_global_statistics_equal_those_of_the_concatenated_tensors,
    check_decisions_are_taken_once_for_all_ranks,
]


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for check in CHECKS:
            check(rank)
            dist.barrier()
            if rank == 0:
                print(f"ok {check.__name__}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"),), nprocs=WORLD, join=True)
