"""Multi-process helpers: which strategies we support, and rank-consistent decisions.

Decisions that change the autograd graph must agree across ranks (DESIGN §4.4). Random decisions are
seeded from the global step (:mod:`lit_partial.conditions`), so they agree by construction; the helpers
here cover what has to be communicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lit_partial._compat import ddp_kwargs
from lit_partial.errors import UnsupportedStrategyError

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "UnsupportedStrategyError",
    "check_supported_strategy",
    "strategy_family",
    "world_size",
]

#: Every strategy family :func:`strategy_family` reports.
FAMILIES: tuple[str, ...] = ("single", "ddp", "fsdp2", "fsdp1", "deepspeed", "other")
#: The families every lit_partial callback supports (single device; DDP in all its launch modes).
DEFAULT_FAMILIES: tuple[str, ...] = ("single", "ddp")


def strategy_family(trainer: Any) -> str:
    """The one answer to "which kind of strategy is running": a name from :data:`FAMILIES`.

    ``"ddp"`` covers ``ddp``, ``ddp_spawn``, ``ddp_fork`` and ``ddp_notebook`` (all ``DDPStrategy``),
    ``"fsdp2"`` Lightning's ``ModelParallelStrategy``, ``"fsdp1"`` its ``FSDPStrategy``.
    Decided by ``isinstance`` on Lightning's public strategy classes, never by names.
    """
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):  # before DDP: DeepSpeedStrategy subclasses DDPStrategy
        return "deepspeed"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    if isinstance(strategy, SingleDeviceStrategy):
        return "single"
    return "other"


_FIXES = {
    "deepspeed": "DeepSpeed partitions parameters and optimizer state outside Lightning's hooks",
    "fsdp1": "FSDP1 flattens parameters into shards",
    "fsdp2": "FSDP2 shards parameters",
}


def check_supported_strategy(trainer: Any, who: str, supported: tuple[str, ...] = DEFAULT_FAMILIES) -> None:
    """Raise before training when ``who`` cannot be correct under the trainer's strategy.

    Args:
        trainer: The Lightning trainer.
        who: The callback's name, for the message.
        supported: Strategy families (see :func:`strategy_family`) ``who`` supports.

    Raises:
        UnsupportedStrategyError: Naming the strategy, the supported families and a fix.
    """
    family = strategy_family(trainer)
    if family in supported:
        return
    why = f" ({_FIXES[family]})" if family in _FIXES else ""
    raise UnsupportedStrategyError(
        f"{who} does not support strategy {family!r} ({type(trainer.strategy).__name__}){why}; supported "
        f"families: {', '.join(supported)}. Fix: use Trainer(strategy='ddp') or strategy='ddp_spawn'"
        + (", or ModelParallelStrategy (FSDP2)" if "fsdp2" in supported else "")
        + f", or drop {who} from the callbacks."
    )


def world_size() -> int:
    """The number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# --- gradients and parameters DDP does not know about (LayerFreezing) ---------------------------------------


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


__all__ += ["all_reduce_gradients", "broadcast_parameters"]


def allow_unused_parameters(trainer: Any, who: str, reason: str) -> bool:
    """Make a DDP strategy accept steps where some parameters get no gradient; call before the model is wrapped.

    Plain DDP (``find_unused_parameters=False``) raises when a parameter gets no gradient on a step, and hangs
    when ranks disagree about which parameters do. With ``find_unused_parameters=True`` every rank marks
    its unused parameters ready, so the all-reduce completes with zero contributions from those ranks and
    replicas stay identical. ``static_graph=True`` promises the opposite of a changing graph, so it is an error.

    Args:
        trainer: The Lightning trainer (its strategy must not have wrapped the model yet: use ``Callback.setup``).
        who: The callback's name, for the log line.
        reason: Why parameters may go unused, for the log line.

    Returns:
        True when the strategy's options were changed (False when not DDP or already allowed).

    Raises:
        UnsupportedStrategyError: If the strategy was configured with ``static_graph=True``.
    """
    if strategy_family(trainer) != "ddp":  # nothing wraps the model in DDP: every graph is fine
        return False
    kwargs = ddp_kwargs(trainer.strategy)
    if kwargs.get("static_graph"):
        raise UnsupportedStrategyError(
            f"{who} changes which parameters get gradients from step to step ({reason}), but the DDP strategy was "
            "built with static_graph=True, which promises a fixed graph. Fix: drop static_graph=True."
        )
    if kwargs.get("find_unused_parameters"):
        return False
    kwargs["find_unused_parameters"] = True
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(
        f"{who}: set DDP find_unused_parameters=True ({reason}); without it plain DDP raises on such steps, or hangs "
        "when ranks decide differently. Cost: one autograd-graph traversal per step (see scripts/bench/dynamic.py)."
    )
    return True


__all__ += ["allow_unused_parameters"]
