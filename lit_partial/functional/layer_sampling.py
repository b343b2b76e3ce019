"""Layer sampling (LISA) and block-coordinate schedules (BAdam) as plain functions: which units train when.

Every decision is a pure function of ``(seed, period)`` or of the optimizer step: the same on every rank and after
a resume, and no global random generator is consumed (LMFlow's LISA draws with ``np.random`` per rank; BAdam's
``random`` order pops ``torch.randperm`` of the global generator). Draws use :class:`random.Random` seeded with a
string, which Python hashes with SHA-512: stable across platforms and Python versions.

The optimizer-state helpers work on any ``torch.optim.Optimizer``: state lives in ``optimizer.state[param]``,
created at a parameter's first update, so dropping a parameter's entry makes its next update start fresh (Adam's
moments and step count from zero) while its group and learning rate stay as they are.

Example:
    >>> sample_layers(8, 2, seed=0, period=0) == sample_layers(8, 2, seed=0, period=0)
    True
    >>> [active_block(step, 3, switch_every=2, order="descending") for step in range(7)]
    [2, 2, 1, 1, 0, 0, 2]
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "ORDERS",
    "active_block",
    "drop_optimizer_state",
    "first_block",
    "optimizer_state_bytes",
    "sample_layers",
]

#: BAdam's block orders: ascending, descending, a fresh random permutation per pass over the blocks, or one block.
ORDERS: tuple[str, ...] = ("ascending", "descending", "random", "fixed")


def _generator(seed: int, salt: str, index: int) -> random.Random:
    return random.Random(f"lit_partial:{salt}:{seed}:{index}")


def sample_layers(num_layers: int, num_active: int, seed: int, period: int) -> list[int]:
    """LISA's draw for ``period``: ``num_active`` distinct layer indices of ``num_layers``, uniformly, sorted.

    A function of ``(seed, period)`` only (LMFlow's uniform sampling without replacement).

    Example:
        >>> draws = [sample_layers(4, 2, seed=1, period=p) for p in range(3)]
        >>> all(len(set(d)) == 2 and d == sorted(d) for d in draws)
        True
    """
    if not 0 <= num_active <= num_layers:
        raise ValueError(f"num_active={num_active} must be between 0 and num_layers={num_layers}.")
    return sorted(_generator(seed, "lisa", period).sample(range(num_layers), num_active))


def first_block(num_blocks: int, order: str, start_block: int | None) -> int:
    """The block BAdam trains first: ``start_block`` if given, else 0 (ascending, fixed) or the last (descending).

    For ``"random"`` the first block comes from the draw (``start_block`` is refused by the callback).
    """
    if start_block is not None:
        return start_block
    return num_blocks - 1 if order == "descending" else 0


def active_block(
    step: int, num_blocks: int, switch_every: int, order: str, start_block: int | None = None, seed: int = 0
) -> int:
    """The block that trains at optimizer step ``step`` (0-based) under BAdam's block-coordinate schedule.

    Block period ``j = step // switch_every`` (every block gets ``switch_every`` updates, the first one too):
    ascending ``(start + j) % n``, descending ``(start - j) % n``, fixed ``start``; random: pass
    ``e = j // n`` over the blocks follows a permutation drawn from ``(seed, e)``.

    Example:
        >>> [active_block(s, 4, 1, "ascending", start_block=2) for s in range(5)]
        [2, 3, 0, 1, 2]
        >>> sorted(active_block(s, 4, 1, "random", seed=3) for s in range(4))
        [0, 1, 2, 3]
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r}; expected one of {ORDERS}.")
    period = step // switch_every
    if order == "random":
        permutation = list(range(num_blocks))
        _generator(seed, "badam", period // num_blocks).shuffle(permutation)
        return permutation[period % num_blocks]
    start = first_block(num_blocks, order, start_block)
    if order == "fixed":
        return start
    return (start + period) % num_blocks if order == "ascending" else (start - period) % num_blocks


def drop_optimizer_state(optimizers: Iterable[torch.optim.Optimizer], params: Sequence[torch.Tensor]) -> int:
    """Forget the optimizer state of ``params`` (their next update starts fresh); returns the entries dropped.

    Parameter groups, their learning rates and every other parameter's state stay as they are.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.Adam([w])
        >>> w.grad = torch.ones(2); opt.step()
        >>> drop_optimizer_state([opt], [w]), len(opt.state)
        (1, 0)
    """
    dropped = 0
    for optimizer in optimizers:
        state = optimizer.state
        for p in params:
            if p in state:
                del state[p]
                dropped += 1
    return dropped


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors the optimizer holds as per-parameter state (Adam: two moments and a step count).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(10))
        >>> opt = torch.optim.AdamW([w])
        >>> w.grad = torch.ones(10); opt.step()
        >>> optimizer_state_bytes(opt)  # exp_avg, exp_avg_sq (10 floats each) and the step (one float)
        84
    """
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )
