"""Sharded tensors (FSDP2 ``DTensor`` parameters): this rank's shard, the whole tensor, a tensor sharded alike."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["full_tensor", "is_dtensor", "local_tensor", "shard_like"]


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (e.g. a parameter after ``fully_shard``)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage and version counter), or ``t`` itself.

    In-place writes to the result (under ``torch.no_grad()``) write the DTensor's local shard.
    """
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]  # a DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (an all-gather: call it on every rank), or ``t`` itself."""
    if not is_dtensor(t):
        return t
    if t.dtype == torch.bool:  # gloo cannot gather bool
        return t.to(torch.uint8).full_tensor().bool()  # type: ignore[attr-defined,no-any-return]  # a DTensor
    return t.full_tensor()  # type: ignore[attr-defined,no-any-return]  # a DTensor


def shard_like(t: torch.Tensor, param: torch.Tensor, *, src_data_rank: int | None = 0) -> torch.Tensor:
    """``t`` (a full tensor that broadcasts to the full ``param``) sharded like the DTensor ``param``.

    Each sharded dimension of ``param`` shards the matching dimension of ``t`` (aligned from the right, as
    broadcasting aligns them); where ``t`` has size 1 in that dimension (or lacks it) it is replicated, so the
    local shard of ``t`` broadcasts to the local shard of ``param``. A mask ``(rows, 1)`` for a row-sharded
    weight ``(rows, cols)`` is sharded by rows; a column mask ``(1, cols)`` is replicated.

    Args:
        t: The full tensor (any device; it is moved to the mesh's device type).
        param: A DTensor parameter; a plain tensor returns ``t`` unchanged.
        src_data_rank: The rank whose ``t`` is scattered to all (``0``: what rank 0 built wins, as with a
            broadcast; a collective, call on every rank). ``None``: every rank takes its own shard of its own
            ``t`` without communication (for a ``t`` that is identical on every rank by construction).
    """
    if not is_dtensor(param):
        return t
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = param.device_mesh  # type: ignore[attr-defined]  # a DTensor
    offset = param.dim() - t.dim()
    placements: list[Any] = []
    for placement in param.placements:  # type: ignore[attr-defined]  # a DTensor
        dim = (placement.dim % param.dim()) - offset if isinstance(placement, Shard) else -1
        placements.append(Shard(dim) if dim >= 0 and t.shape[dim] != 1 else Replicate())
    source = t.detach().to(mesh.device_type)
    as_bool = source.dtype == torch.bool
    if as_bool and src_data_rank is not None:
        source = source.to(torch.uint8)  # gloo cannot scatter or broadcast bool
    sharded = distribute_tensor(source, mesh, placements, src_data_rank=src_data_rank)
    return sharded.bool() if as_bool and sharded.dtype != torch.bool else sharded
