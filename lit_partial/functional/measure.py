"""Deterministic counters for claims: FLOPs of a training step (saved-activation bytes live beside it).

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(4, 3, bias=False)
    >>> # forward 2*2*4*3 = 48; backward computes only the weight gradient (the input needs none): 48 more
    >>> count_flops(lambda: layer(torch.randn(2, 4)).sum().backward())
    96
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops"]


def count_flops(fn: Callable[[], Any]) -> int:
    """Run ``fn`` once and return the FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts.

    Matrix products and convolutions are counted (forward and backward); elementwise ops are not,
    which is what makes ratios such as ``1 - 2k/(3N)`` for freezing exact.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
