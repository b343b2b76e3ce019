"""Dropped backward passes (DropBP, Woo et al., NeurIPS 2024): branches keep their forward, lose their backward.

A residual block computes ``x + branch(x)``; DropBP replaces it, with probability ``p_i`` per branch and step, by
``x + branch(x).detach()``: the output is the same, but backward skips the branch (its parameters get no gradient
and nothing flows through it; the residual path still carries the gradient). Pure functions behind
:class:`lit_partial.DropBackward`:

* :func:`drop_branch_outputs` - the forward hooks that detach the outputs of the branches a predicate names;
* :func:`allocate_drop_rates` - DropBP's greedy allocation of per-branch rates from sensitivities and FLOPs;
* :func:`draw_drop_set` - one step's drop set: a Bernoulli draw per branch, topped up (DropBP's rule) so that
  at least the target fraction of branches is dropped;
* :func:`weighted_drop_rate` - the FLOPs-weighted average rate ``sum(f_i p_i) / sum(f_i)``.

Example:
    >>> [round(p, 2) for p in allocate_drop_rates([1.0, 4.0], [10, 10], rate=0.5)]  # less sensitive: dropped more
    [0.8, 0.2]
    >>> draw_drop_set([0.5, 0.5, 0.5, 0.5], [0.9, 0.1, 0.8, 0.7], target=0.5)  # one drawn, one topped up
    [True, True, False, False]
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

from torch import nn

from lit_partial.errors import ConfigurationError
from lit_partial.handles import Handles
from lit_partial.tree import detach

__all__ = ["allocate_drop_rates", "draw_drop_set", "drop_branch_outputs", "weighted_drop_rate"]


def drop_branch_outputs(branches: Sequence[tuple[str, nn.Module]], dropped: Callable[[str], bool]) -> Handles:
    """Detach the output of each branch while ``dropped(name)`` holds (asked at every call).

    Example:
        >>> import torch
        >>> branch = torch.nn.Linear(2, 2)
        >>> handles = drop_branch_outputs([("mlp", branch)], lambda name: True)
        >>> x = torch.randn(3, 2, requires_grad=True)
        >>> (x + branch(x)).sum().backward()
        >>> branch.weight.grad is None, bool((x.grad == 1).all())
        (True, True)
        >>> handles.remove()
    """
    handles = Handles()
    for name, module in branches:

        def hook(mod: nn.Module, args: object, output: object, name: str = name) -> object:
            return detach(output) if dropped(name) else None

        handles.add(module.register_forward_hook(hook))
    return handles


def weighted_drop_rate(rates: Sequence[float], flops: Sequence[float]) -> float:
    """The FLOPs-weighted average drop rate ``sum(f_i p_i) / sum(f_i)``.

    Example:
        >>> weighted_drop_rate([0.0, 1.0], [1, 3])
        0.75
    """
    total = float(sum(flops))
    return sum(p * f for p, f in zip(rates, flops, strict=True)) / total if total else 0.0


def allocate_drop_rates(
    sensitivities: Sequence[float],
    flops: Sequence[float],
    rate: float,
    *,
    min_rate: float = 0.0,
    increment: float = 0.1,
    max_rate: float = 0.9,
) -> list[float]:
    """Per-branch drop rates whose FLOPs-weighted average reaches ``rate``, least sensitive branches first.

    DropBP's greedy rule (``allocate_p``): start every branch at ``min_rate``; while the backward FLOPs kept,
    ``sum(f_i) * (1 - min_rate) - sum(increment * f_i)`` over the increments so far, exceed
    ``int((1 - rate) * sum(f_i))``, raise by ``increment`` the rate of the branch whose next increment costs least,
    ``C_i * (p_i + increment)`` (ties: the later branch, as the reference's max-heap pops them); a branch stops
    rising once its rate reaches ``max_rate``.

    Args:
        sensitivities: ``C_i``: how much dropping branch ``i`` alone changes the gradient.
        flops: ``f_i``: the forward FLOPs of branch ``i`` (backward FLOPs are proportional).
        rate: The target FLOPs-weighted average drop rate.
        min_rate: The rate every branch starts at.
        increment: The step of the greedy rule.
        max_rate: No branch rises further once its rate reaches this.

    Raises:
        ConfigurationError: If the lengths differ or the target cannot be reached under ``max_rate``.
    """
    if len(sensitivities) != len(flops) or not flops:
        raise ConfigurationError(
            f"need one sensitivity per branch: got {len(sensitivities)} sensitivities for {len(flops)} branches."
        )
    steps = [0] * len(flops)  # increments per branch: rates are min_rate + steps * increment, without drift
    target = int((1 - rate) * sum(flops))
    kept = float(sum(flops)) * (1 - min_rate)
    heap = [(c * (increment + min_rate), -i) for i, c in enumerate(sensitivities)]
    heapq.heapify(heap)
    while kept > target:
        if not heap:
            raise ConfigurationError(
                f"a drop rate of {rate} cannot be reached with per-branch rates of at most {max_rate}. Fix: lower "
                "`rate`, or raise `max_rate`."
            )
        cost, neg = heapq.heappop(heap)
        i = -neg
        steps[i] += 1
        kept -= flops[i] * increment
        if min_rate + steps[i] * increment < max_rate - 1e-9:
            heapq.heappush(heap, (cost + increment * sensitivities[i], neg))
    return [min_rate + k * increment for k in steps]


def draw_drop_set(rates: Sequence[float], draws: Sequence[float], target: float, *, top_up: bool = True) -> list[bool]:
    """Which branches one step drops: ``draws[i] < rates[i]``, then (``top_up``) DropBP's adjustment.

    The adjustment (``set_dropped_layers``): while fewer than ``target`` of the branches are dropped, drop the
    undropped branch with the highest rate (ties: the earlier one).

    Args:
        rates: Each branch's drop rate.
        draws: One uniform number in [0, 1) per branch (the same on every rank).
        target: The fraction of branches to drop at least.
        top_up: Apply the adjustment (DropBP does); without it the drop set is the Bernoulli draw alone.
    """
    dropped = [u < p for u, p in zip(draws, rates, strict=True)]
    n = len(dropped)
    if top_up and n:
        for i in sorted(range(n), key=lambda j: -rates[j]):
            if sum(dropped) / n >= target:
                break
            dropped[i] = True
    return dropped
