"""AutoFreeze's rule as plain functions: freeze the front layers whose gradients stopped changing.

Liu, Agarwal, Venkataraman, arXiv 2102.01386; reference: YuhanLiu11/AutoFreeze ``freeze_intermediate_e2e_lr.py``.
Every evaluation interval, layer ``l``'s gradient norm ``G_l`` is the L1 norm of its gradients summed over the
interval; its change ``r_l = |G_l^prev - G_l| / G_l^prev``; the threshold is the ``percentile`` of the changes of
the layers still training; the new first trainable layer is the first of those whose change is at or above it, and
every layer before it is frozen. Frozen layers are never thawed: the reference searches from layer 0, so a threshold
of 0 (no trainable layer's gradient changed) would set its start back to 0; here the search starts at the current
first trainable layer.

Example:
    >>> freeze_start([4.0, 4.0, 4.0], [3.9, 3.0, 1.0], start=0, percentile=50)
    1
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["freeze_start", "gradient_change", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` with linear interpolation, computed as ``numpy.percentile`` does.

    The same floating-point steps as numpy's default ``method="linear"`` (its virtual index ``(n - 1) q`` and its
    two-sided interpolation), so a decision taken against the threshold matches the reference's exactly.

    Example:
        >>> percentile([1.0, 2.0, 4.0, 8.0], 50)
        3.0
    """
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    n = len(ordered)
    quantile = q / 100
    virtual = (n - 1) * quantile  # numpy's virtual index for method="linear"
    below = math.floor(virtual)
    gamma = virtual - below
    lo = ordered[min(max(below, 0), n - 1)]
    hi = ordered[min(max(below + 1, 0), n - 1)]
    if below < 0:
        return ordered[0]
    if below >= n - 1:
        return ordered[-1]
    diff = hi - lo
    return hi - diff * (1 - gamma) if gamma >= 0.5 else lo + diff * gamma  # numpy's _lerp


def gradient_change(previous: Sequence[float], current: Sequence[float]) -> list[float]:
    """Per layer ``|previous - current| / previous``; 0 where ``current`` is 0 (a frozen layer), as AutoFreeze.

    A layer whose previous norm was 0 and whose current one is not changed without bound: ``inf`` (the reference
    divides by zero there).

    Example:
        >>> gradient_change([2.0, 4.0, 1.0], [1.0, 4.0, 0.0])
        [0.5, 0.0, 0.0]
    """
    changes = []
    for before, now in zip(previous, current, strict=True):
        if now > 0:
            changes.append(abs(before - now) / before if before > 0 else math.inf)
        else:
            changes.append(0.0)
    return changes


def freeze_start(previous: Sequence[float], current: Sequence[float], start: int, percentile: float) -> int:
    """The first layer that keeps training after this evaluation (layers before it freeze); never below ``start``.

    Args:
        previous: Each layer's gradient L1 norm summed over the previous interval.
        current: The same over this interval (0 for frozen layers).
        start: The first layer training now.
        percentile: The percentile (0-100) of the trainable layers' changes used as the threshold.
    """
    changes = gradient_change(previous, current)
    threshold = _percentile(changes[start:], percentile)
    return next(i for i in range(start, len(changes)) if changes[i] >= threshold)


_percentile = percentile  # the argument of freeze_start shadows the function's name
