"""Collectives over the default process group (each a no-op when not distributed).

Ranks, gradients and parameters DDP does not know, statistics and decisions every rank takes the same way, and
per-rank state for checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device

__all__ = [
    "all_reduce_gradients",
    "any_rank",
    "broadcast_parameters",
    "gather_objects",
    "global_statistic",
    "holds_on_all_ranks",
    "rank",
    "world_size",
]


def world_size() -> int:
    """The number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> int:
    """Average the gradients of ``params`` over all ranks in ONE coalesced all-reduce, as DDP would.

    For parameters DDP never registered (e.g. unfrozen after the model was wrapped). A parameter whose
    gradient is ``None`` on some ranks counts as zero there, like DDP's unused parameters; one that has no
    gradient on any rank keeps ``.grad = None`` (optimizers then skip it). Every rank must pass the same
    parameters in the same order. A no-op (returning 0) when not distributed.

    Returns:
        The number of gradient elements reduced.
    """
    size = world_size()
    if size == 1 or not params:
        return 0
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    # One buffer holds every gradient plus one presence flag per parameter: a single collective per step.
    flat = torch.cat([g.reshape(-1).to(torch.float32 if g.dtype.is_floating_point else g.dtype) for g in grads])
    flat = torch.cat([flat, present.to(flat.dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    counts = flat[-len(params) :]
    offset = 0
    for p, g, count in zip(params, grads, counts.tolist(), strict=True):
        n = g.numel()
        if count > 0:
            reduced = flat[offset : offset + n].view_as(g).div_(size).to(g.dtype)
            if p.grad is None:
                p.grad = reduced.clone()
            else:
                p.grad.copy_(reduced)
        offset += n
    return offset


def broadcast_parameters(params: Sequence[torch.Tensor], src: int = 0) -> None:
    """Copy ``params`` from rank ``src`` to every rank in one coalesced broadcast (no-op when not distributed).

    For parameters excluded from DDP (:func:`lit_partial._compat.set_ddp_ignored_names`), which DDP does not
    broadcast when it wraps the model.
    """
    if world_size() == 1 or not params:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.broadcast(flat, src=src)
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def global_statistic(stat: str, x: torch.Tensor) -> torch.Tensor:
    """A statistic of the union of every rank's ``x`` (one small all-reduce; call on every rank).

    Equals the statistic of all ranks' tensors concatenated, as one process holding the whole global batch
    would compute it (in float64, so it may differ from a float32 single-process value in the last bits).

    Args:
        stat: One of ``"mean"``, ``"abs_mean"``, ``"max"``, ``"min"``, ``"std"`` (unbiased), ``"norm"``.
        x: This rank's tensor (any shape; may be empty on some ranks).

    Returns:
        A 0-d float64 tensor on ``x``'s device, identical on every rank.
    """
    x = x.detach().to(torch.float64)
    if stat in ("max", "min"):
        fill = float("-inf") if stat == "max" else float("inf")
        value = (x.max() if stat == "max" else x.min()) if x.numel() else x.new_tensor(fill)  # float64 on all ranks
        if world_size() > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX if stat == "max" else dist.ReduceOp.MIN)
        return value
    total = x.abs().sum() if stat == "abs_mean" else x.sum()
    sums = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), total, (x * x).sum()])
    if world_size() > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    n, s, ss = sums.unbind()
    if stat in ("mean", "abs_mean"):
        return s / n
    if stat == "norm":
        return ss.sqrt()
    if stat == "std":
        return ((ss - s * s / n).clamp_min(0.0) / (n - 1)).sqrt()
    raise ValueError(f"unknown statistic {stat!r}; expected mean, abs_mean, max, min, std or norm.")


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """Whether ``flag`` is True on some rank (one all-reduce; call on every rank). ``flag`` when not distributed.

    Args:
        flag: This rank's value.
        device: Where the collective's tensor lives (default: the device of the default group's backend).
    """
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor([float(flag)], device=device if device is not None else _collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def holds_on_all_ranks(condition: Any, ctx: Any, x: torch.Tensor | None, salt: str = "") -> bool:
    """Decide ``condition`` once for all ranks (call on every rank): ``condition.agreed(ctx, x, salt=salt)``.

    Kept for its import path; the behaviour lives on each condition (:meth:`lit_partial.conditions.Condition.agreed`).
    """
    return bool(condition.agreed(ctx, x, salt=salt))


def _collective_device() -> torch.device:
    """The device collectives of the default group run on (``cuda`` for NCCL, else ``cpu``)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``all_gather_object``: a collective, call it on every rank).

    For state that differs per rank (e.g. a rank's own samples) in a checkpoint, which Lightning writes from
    rank 0 only: each callback ``state_dict`` call happens on every rank when Lightning saves. Tensors are
    moved to the CPU first, so the result unpickles on any rank. ``[obj]`` when not distributed.
    """
    obj = move_data_to_device(obj, torch.device("cpu"))
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
