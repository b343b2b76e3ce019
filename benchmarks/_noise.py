"""Harder versions of a labelled data set, for experiments: label noise and class imbalance.

Both are seeded and exact: :func:`flip_labels` changes exactly ``round(fraction * N)`` labels, each to a
different class drawn uniformly; :func:`imbalanced_indices` keeps exactly ``round(keep * n_c)`` samples of each
class ``c`` (``keep > 1`` repeats samples). Neither touches the global RNG.

Example:
    >>> import torch
    >>> labels = torch.arange(10).repeat(10)
    >>> noisy, flipped = flip_labels(labels, 0.3, num_classes=10, seed=0)
    >>> int(flipped.sum()), bool((noisy[flipped] != labels[flipped]).all())
    (30, True)
    >>> torch.equal(noisy[~flipped], labels[~flipped])
    True
    >>> len(imbalanced_indices(labels, {0: 0.1, 1: 0.5}, seed=0))  # 1 + 5 + 8 classes x 10
    86
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lit_partial.errors import ConfigurationError

__all__ = ["flip_labels", "imbalanced_indices"]


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigurationError(f"`seed` must be an integer, got {seed!r}.")
    return torch.Generator().manual_seed(seed)


def flip_labels(
    labels: Tensor, fraction: float, num_classes: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """A copy of ``labels`` with exactly ``round(fraction * N)`` of them changed to another class, and which ones.

    The flipped positions are a uniform draw without replacement; each flipped label becomes one of the other
    ``num_classes - 1`` classes, uniformly (symmetric label noise), so it always differs from the original.

    Args:
        labels: Integer class labels, shape ``(N,)``, values in ``[0, num_classes)``.
        fraction: Fraction of labels to flip, in [0, 1].
        num_classes: Number of classes (default: ``labels.max() + 1``); at least 2.
        seed: Seed of the draw: the same seed gives the same flips.

    Returns:
        ``(noisy_labels, flipped)``: the new labels and a bool mask of the flipped positions.

    Raises:
        ConfigurationError: ``fraction`` outside [0, 1], fewer than 2 classes, or labels out of range.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
        raise ConfigurationError(f"`fraction` must be in [0, 1], got {fraction!r}; e.g. 0.2 flips a fifth.")
    if labels.ndim != 1 or labels.is_floating_point():
        raise ConfigurationError(
            f"`labels` must be a 1-d integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}."
        )
    classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if classes < 2 or (labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes)):
        raise ConfigurationError(
            f"labels must lie in [0, num_classes) with num_classes >= 2, got num_classes={classes} and labels in "
            f"[{int(labels.min())}, {int(labels.max())}]. Fix: pass num_classes=<number of classes>."
        )
    generator = _generator(seed)
    count = round(fraction * labels.numel())
    where = torch.randperm(labels.numel(), generator=generator)[:count]
    shift = torch.randint(1, classes, (count,), generator=generator)  # 1 .. classes-1: never the same class
    noisy = labels.clone()
    noisy[where] = (labels[where] + shift) % classes
    flipped = torch.zeros(labels.numel(), dtype=torch.bool)
    flipped[where] = True
    return noisy, flipped


def imbalanced_indices(labels: Tensor, keep: Mapping[int, float], seed: int = 0) -> Tensor:
    """Sorted indices of a resampled set holding ``round(keep[c] * n_c)`` samples of class ``c`` (1.0 if unlisted).

    ``keep[c] < 1`` thins class ``c`` (a uniform draw without replacement); ``keep[c] > 1`` repeats it: every
    sample ``floor(keep[c])`` times, plus a draw of the rest (redundant data, e.g. easy classes scraped many times).

    Args:
        labels: Integer class labels, shape ``(N,)``.
        keep: Factor per class, ``>= 0``: ``{5: 0.1, 6: 0.1}`` for two rare classes, ``{0: 8}`` for a redundant one.
        seed: Seed of the draws.

    Raises:
        ConfigurationError: A negative or non-numeric factor.
    """
    for c, f in keep.items():
        if isinstance(f, bool) or not isinstance(f, int | float) or f < 0:
            raise ConfigurationError(
                f"keep[{c!r}] must be a number >= 0, got {f!r}; e.g. 0.1 keeps a tenth, 2 doubles."
            )
    generator = _generator(seed)
    chosen = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        count = round(float(keep.get(c, 1.0)) * members.numel())
        copies, rest = divmod(count, max(members.numel(), 1))
        chosen += [members] * copies
        chosen.append(members[torch.randperm(members.numel(), generator=generator)[:rest]])
    return torch.sort(torch.cat(chosen)).values
