"""Multi-process helpers: which strategies we support, and rank-consistent decisions.

Decisions that change the autograd graph must agree across ranks (DESIGN §4.4). Random decisions are
seeded from the global step (:mod:`lit_partial.conditions`), so they agree by construction; the helpers
here cover what has to be communicated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from lit_partial.errors import UnsupportedStrategyError

__all__ = ["UnsupportedStrategyError", "check_supported_strategy", "strategy_name", "world_size"]

#: Strategy families every lit_partial callback supports today (single device, DDP, DDP spawn).
SUPPORTED_STRATEGIES: tuple[str, ...] = ("single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


def strategy_name(trainer: Any) -> str:
    """A short, lower-case name of the trainer's strategy family (``"ddp"``, ``"deepspeed"``, ``"fsdp"``, ...)."""
    strategy = trainer.strategy
    name = getattr(strategy, "strategy_name", None) or type(strategy).__name__
    return str(name).lower().replace("strategy", "") or "unknown"


def check_supported_strategy(trainer: Any, who: str, supported: tuple[str, ...] = SUPPORTED_STRATEGIES) -> None:
    """Raise before training when ``who`` cannot be correct under the trainer's strategy.

    Args:
        trainer: The Lightning trainer.
        who: The callback's name, for the message.
        supported: Strategy families ``who`` supports.

    Raises:
        UnsupportedStrategyError: Naming the strategy, the supported ones and a fix.
    """
    name = strategy_name(trainer)
    family = "ddp" if name.startswith("ddp") else name
    if name in supported or family in supported or name.startswith("single"):
        return
    raise UnsupportedStrategyError(
        f"{who} does not support strategy {name!r} yet (supported: {', '.join(supported)}). "
        f"Fix: use Trainer(strategy='ddp') or strategy='ddp_spawn', or drop {who} from the callbacks."
    )


def world_size() -> int:
    """The number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_ranks_agree(flag: bool, device: torch.device | None = None) -> bool:
    """True when ``flag`` is the same on every rank (always True when not distributed)."""
    if world_size() == 1:
        return True
    t = torch.tensor([int(flag), -int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == -int(t[1])


# --- gradients and parameters DDP does not know about (LayerFreezing) ---------------------------------------


def all_reduce_gradients(params: list[torch.Tensor]) -> int:
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


def broadcast_parameters(params: list[torch.Tensor], src: int = 0) -> None:
    """Copy ``params`` from rank ``src`` to every rank in one coalesced broadcast (no-op when not distributed).

    For parameters excluded from DDP (``_ddp_params_and_buffers_to_ignore``), which DDP does not broadcast
    when it wraps the model.
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
        RuntimeError: If the strategy was configured with ``static_graph=True``.
    """
    kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
    if kwargs is None:  # not a DDP strategy: nothing wraps the model, every graph is fine
        return False
    if kwargs.get("static_graph"):
        raise RuntimeError(
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
