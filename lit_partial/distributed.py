"""Multi-process helpers: which strategies we support, and rank-consistent decisions.

Decisions that change the autograd graph must agree across ranks (DESIGN §4.4). Random decisions are
seeded from the global step (:mod:`lit_partial.conditions`), so they agree by construction; the helpers
here cover what has to be communicated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["UnsupportedStrategyError", "check_supported_strategy", "strategy_name", "world_size"]

#: Strategy families every lit_partial callback supports today (single device, DDP, DDP spawn).
SUPPORTED_STRATEGIES: tuple[str, ...] = ("single_device", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")


class UnsupportedStrategyError(RuntimeError):
    """The trainer's strategy is one a callback cannot yet make correct."""


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
