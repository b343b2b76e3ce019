"""Per-sample selection for selective backprop: score, choose, slice, pool.

Pure tensor functions behind :class:`lit_partial.SelectiveBackprop`, usable in any training loop:

* :func:`select_topk` keeps the ``keep`` fraction with the highest loss (Selective-Backprop, deterministic);
* :func:`select_outliers` drops the losses above the ``keep`` quantile (robust training against label noise);
* :func:`select_probability` keeps each sample with probability ``CDF(loss) ** beta``, the CDF taken over a
  history of recent losses and ``beta = 1 / keep - 1`` so that about ``keep`` of the samples are kept
  (Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers");
* :func:`slice_batch` / :func:`concat_batches` / :func:`batch_size_of` handle every structure
  :mod:`lit_partial.tree` does (tensors, tuples, named tuples, lists, dicts, ``BatchEncoding``,
  dataclasses, nested in any way), sliced along the first dimension;
* :class:`SamplePool` holds selected samples so every step gets the same number of them.

Example:
    >>> import torch
    >>> losses = torch.tensor([0.1, 2.0, 0.5, 3.0])
    >>> select_topk(losses, keep=0.5)
    tensor([1, 3])
    >>> select_outliers(losses, keep=0.75)
    tensor([0, 1, 2])
    >>> batch = {"x": torch.arange(8).view(4, 2), "y": torch.arange(4)}
    >>> slice_batch(batch, torch.tensor([1, 3]))["y"]
    tensor([1, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lit_partial.errors import ConfigurationError, UnsupportedBatchError
from lit_partial.tree import leaves, map_tensors, rebuild

__all__ = [
    "SamplePool",
    "UnsupportedBatchError",
    "batch_size_of",
    "concat_batches",
    "num_kept",
    "probability_beta",
    "select_outliers",
    "select_probability",
    "select_topk",
    "selection_probabilities",
    "slice_batch",
    "take_pooled",
    "update_history",
]


def _check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ConfigurationError(
            f"`keep` must be a fraction in (0, 1], got {keep!r}; e.g. keep=0.5 keeps half of each batch."
        )


def num_kept(batch_size: int, keep: float) -> int:
    """How many of ``batch_size`` samples a ``keep`` fraction keeps: ``round(keep * B)``, at least 1.

    Example:
        >>> num_kept(64, 0.25), num_kept(3, 0.1)
        (16, 1)
    """
    _check_keep(keep)
    return max(1, min(batch_size, round(keep * batch_size)))


def _check_losses(losses: Tensor) -> None:
    if not isinstance(losses, Tensor) or losses.dim() != 1:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ConfigurationError(f"`losses` must be a 1-D tensor of per-sample losses, got {shape}.")


def select_topk(losses: Tensor, keep: float) -> Tensor:
    """Indices (ascending) of the ``num_kept(B, keep)`` samples with the highest loss; ties keep lower indices.

    Example:
        >>> select_topk(torch.tensor([3.0, 1.0, 2.0]), keep=2 / 3)
        tensor([0, 2])
    """
    return _extreme_indices(losses, keep, highest=True)


def select_outliers(losses: Tensor, keep: float) -> Tensor:
    """Indices (ascending) of the ``num_kept(B, keep)`` lowest losses: the losses above the ``keep`` quantile go.

    Example:
        >>> select_outliers(torch.tensor([3.0, 1.0, 2.0]), keep=2 / 3)
        tensor([1, 2])
    """
    return _extreme_indices(losses, keep, highest=False)


def _extreme_indices(losses: Tensor, keep: float, *, highest: bool) -> Tensor:
    _check_losses(losses)
    order = torch.sort(losses.detach(), descending=highest, stable=True).indices  # stable: ties keep lower indices
    return torch.sort(order[: num_kept(losses.numel(), keep)]).values


def probability_beta(keep: float) -> float:
    """The exponent ``beta`` with ``E[U ** beta] = keep`` for ``U ~ Uniform(0, 1)``: ``1 / keep - 1``.

    The CDF of a loss over a history of losses from the same distribution is uniform, so selecting with
    probability ``CDF(loss) ** beta`` keeps ``1 / (beta + 1) = keep`` of the samples on average.

    Example:
        >>> probability_beta(0.25)
        3.0
    """
    _check_keep(keep)
    return 1.0 / keep - 1.0


def update_history(history: Tensor | None, losses: Tensor, size: int) -> Tensor:
    """The last ``size`` losses of ``history`` followed by ``losses`` (a ring buffer, oldest first).

    Example:
        >>> update_history(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), size=3)
        tensor([2., 3., 4.])
    """
    if size < 1:
        raise ConfigurationError(f"`size` must be a positive integer, got {size!r}.")
    losses = losses.detach().float().reshape(-1)
    merged = losses if history is None or history.numel() == 0 else torch.cat([history.to(losses.device), losses])
    return merged[-size:].clone()


def selection_probabilities(losses: Tensor, history: Tensor, beta: float) -> Tensor:
    """``CDF(loss) ** beta``: the fraction of ``history`` at or below each loss, raised to ``beta``.

    Example:
        >>> selection_probabilities(torch.tensor([1.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]), beta=1.0)
        tensor([0.2500, 1.0000])
    """
    _check_losses(losses)
    if history.numel() == 0:
        raise ConfigurationError("`history` is empty; include the current losses (see update_history) before scoring.")
    ordered = torch.sort(history.detach().float().reshape(-1)).values
    cdf = torch.searchsorted(ordered, losses.detach().float(), right=True).float() / ordered.numel()
    return cdf.pow(beta)


def select_probability(losses: Tensor, history: Tensor, keep: float, generator: torch.Generator) -> Tensor:
    """Indices (ascending) of the samples kept with probability ``CDF(loss) ** (1 / keep - 1)``.

    The number kept is random (about ``keep`` of the batch on average, possibly zero); callers that need a
    fixed count pool the kept samples (:class:`SamplePool`). Draws come from ``generator`` only, never from
    the global RNG, so the selection is reproducible and resumable.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> losses = torch.linspace(0, 1, 10_000)
        >>> kept = select_probability(losses, losses, keep=0.25, generator=g)
        >>> round(kept.numel() / 10_000, 2), bool(losses[kept].mean() > 0.7)
        (0.25, True)
    """
    probs = selection_probabilities(losses, history, probability_beta(keep))
    draws = torch.rand(probs.shape, generator=generator, device=generator.device).to(probs.device)
    return torch.nonzero(draws < probs).reshape(-1)


def _tensors(batch: Any) -> list[Tensor]:
    return leaves(batch, plain="error", what="batch", error=UnsupportedBatchError)


def batch_size_of(batch: Any) -> int:
    """The common first dimension of every tensor in ``batch``.

    Raises:
        UnsupportedBatchError: If an element is not a tensor or container (naming its type and place).
        ValueError: If the batch holds no tensor, a 0-d tensor, or tensors with different first dimensions.

    Example:
        >>> batch_size_of((torch.zeros(4, 3), {"y": torch.zeros(4)}))
        4
    """
    tensors = _tensors(batch)
    if not tensors:
        raise ConfigurationError("the batch holds no tensor; SelectiveBackprop needs tensors with a batch dimension.")
    if any(t.dim() == 0 for t in tensors):
        raise ConfigurationError(
            "the batch holds a 0-d tensor; every tensor in the batch needs a first (batch) dimension."
        )
    sizes = [t.shape[0] for t in tensors]
    if len(set(sizes)) > 1:
        shapes = [tuple(t.shape) for t in tensors]
        raise ConfigurationError(
            f"tensors in the batch disagree on the first (batch) dimension: shapes {shapes} in traversal order. Fix: "
            "give every tensor the batch dimension first."
        )
    return sizes[0]


def slice_batch(batch: Any, index: Tensor) -> Any:
    """``batch`` with every tensor indexed by ``index`` along the first dimension; containers keep their type.

    Example:
        >>> x, y = slice_batch((torch.arange(6).view(3, 2), torch.arange(3)), torch.tensor([2]))
        >>> x.tolist(), y.tolist()
        ([[4, 5]], [2])
    """
    return map_tensors(
        batch, lambda t: t.index_select(0, index.to(t.device)), plain="error", what="batch", error=UnsupportedBatchError
    )


def concat_batches(batches: Sequence[Any]) -> Any:
    """Concatenate batches of the same structure along the first dimension.

    Raises:
        ValueError: If the structures differ.

    Example:
        >>> concat_batches([{"y": torch.tensor([1])}, {"y": torch.tensor([2, 3])}])["y"]
        tensor([1, 2, 3])
    """
    if not batches:
        raise ConfigurationError("`batches` is empty; nothing to concatenate.")
    shapes = [
        map_tensors(b, lambda t: "tensor", plain="error", what="batch", error=UnsupportedBatchError) for b in batches
    ]
    if any(shape != shapes[0] for shape in shapes[1:]):
        raise ConfigurationError(
            "cannot concatenate batches of different structure (different keys, lengths or container types): "
            f"{shapes[0]!r:.100} vs {next(s for s in shapes if s != shapes[0])!r:.100}."
        )
    columns = zip(*(_tensors(b) for b in batches), strict=True)
    return rebuild(batches[0], [torch.cat([t.to(ts[-1].device) for t in ts]) for ts in columns])


class SamplePool:
    """First-in first-out store of selected samples (and their scoring losses), capped at ``capacity``.

    :func:`select_probability` keeps a random number of samples per batch; the pool absorbs that
    randomness so that every step can train on exactly the same number of samples.

    Args:
        capacity: Most samples held after :meth:`take`; the oldest beyond it are dropped as stale.

    Example:
        >>> pool = SamplePool(capacity=4)
        >>> pool.add((torch.arange(3),), torch.tensor([1.0, 2.0, 3.0]))
        >>> batch, losses = pool.take(2)
        >>> batch[0].tolist(), len(pool)
        ([0, 1], 1)
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigurationError(f"`capacity` must be a positive integer, got {capacity!r}.")
        self.capacity = capacity
        self.batch: Any = None
        self.losses: Tensor | None = None
        self.dropped = 0

    def __len__(self) -> int:
        return 0 if self.losses is None else int(self.losses.numel())

    def add(self, batch: Any, losses: Tensor) -> None:
        """Append samples (a batch structure) with their losses, after those already held."""
        if losses.numel() == 0:
            return
        if self.losses is None:
            self.batch, self.losses = batch, losses.detach()
        else:
            self.batch = concat_batches([self.batch, batch])
            self.losses = torch.cat([self.losses.to(losses.device), losses.detach()])

    def take(self, n: int) -> tuple[Any, Tensor]:
        """Remove and return the ``n`` oldest samples and their losses, then drop the oldest beyond capacity."""
        if not 0 < n <= len(self):
            raise ConfigurationError(f"cannot take {n} samples from a pool of {len(self)}.")
        assert self.losses is not None
        total = len(self)
        head = torch.arange(n, device=self.losses.device)
        out = slice_batch(self.batch, head), self.losses[:n]
        rest = total - n
        start = n + max(0, rest - self.capacity)
        self.dropped += start - n
        if start >= total:
            self.batch, self.losses = None, None
        else:
            tail = torch.arange(start, total, device=self.losses.device)
            self.batch, self.losses = slice_batch(self.batch, tail), self.losses[start:]
        return out

    def state_dict(self) -> dict[str, Any]:
        """The held samples, their losses and the drop count."""
        return {"batch": self.batch, "losses": self.losses, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.batch, self.losses, self.dropped = state["batch"], state["losses"], int(state["dropped"])


def take_pooled(pool: SamplePool, batch: Any, losses: Tensor, chosen: Tensor, n: int) -> tuple[Any, Tensor]:
    """Add the ``chosen`` samples of ``batch`` to ``pool``, then take exactly ``n`` samples, oldest first.

    When the pool holds fewer than ``n``, the highest-loss samples of ``batch`` that were not chosen top it
    up, so the result never has fewer than ``n`` samples (``n <= batch size``).

    Example:
        >>> pool = SamplePool(capacity=8)
        >>> batch, losses = take_pooled(pool, (torch.arange(4),), torch.tensor([0.0, 3.0, 1.0, 2.0]),
        ...                             chosen=torch.tensor([2]), n=2)
        >>> batch[0].tolist(), len(pool)
        ([2, 1], 0)
    """
    pool.add(slice_batch(batch, chosen), losses[chosen])
    missing = n - len(pool)
    if missing > 0:
        unchosen = torch.ones_like(losses, dtype=torch.bool)
        unchosen[chosen] = False
        candidates = torch.nonzero(unchosen).reshape(-1)
        order = torch.sort(losses[candidates], descending=True, stable=True).indices
        top_up = candidates[order[:missing]]
        pool.add(slice_batch(batch, top_up), losses[top_up])
    return pool.take(n)
