"""Token-level selection (Rho-1, selective language modeling): score target tokens, keep the top fraction.

Tokens cannot be dropped from a causal forward, so token selection is a *loss mask*: every token is forwarded,
only the kept ones contribute to the loss (Lin et al., NeurIPS 2024, arXiv 2404.07965). Pure tensor functions
behind :class:`lit_partial.TokenSelection`, usable in any training loop:

* :func:`token_losses` - per-token cross-entropy ``(B, T)`` and the valid-token mask, with Hugging Face's label
  shift for causal LMs; labels equal to ``ignore_index`` (``-100``) are invalid;
* :func:`token_scores` - the score of each token: its loss, or its *excess* loss over a reference model;
* :func:`select_tokens` - the kept mask: the top ``round(keep * n_valid)`` valid tokens by score (ties keep the
  lower flat index), computed without a host-device sync;
* :func:`masked_token_mean` - the mean loss over a mask (the loss to backpropagate).

Example:
    >>> import torch
    >>> losses = torch.tensor([[0.1, 2.0, 0.5], [3.0, 0.2, 9.0]])
    >>> valid = torch.tensor([[True, True, True], [True, True, False]])
    >>> kept = select_tokens(losses, valid, keep=0.4)  # round(0.4 * 5) = 2 of the 5 valid tokens
    >>> kept.int().tolist()
    [[0, 1, 0], [1, 0, 0]]
    >>> masked_token_mean(losses, kept)
    tensor(2.5000)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_partial.errors import ConfigurationError

__all__ = ["SCORES", "masked_token_mean", "num_kept_tokens", "select_tokens", "token_losses", "token_scores"]

#: The scores :func:`token_scores` knows.
SCORES = ("loss", "excess_loss")


def _check_keep(keep: float) -> None:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ConfigurationError(
            f"`keep` must be a fraction in (0, 1], got {keep!r}; e.g. keep=0.6 trains on the top 60% of tokens."
        )


def token_losses(
    logits: Tensor, labels: Tensor, *, shift: bool = True, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy and the mask of tokens that count.

    Args:
        logits: ``(B, T, V)`` scores over the vocabulary.
        labels: ``(B, T)`` target ids; ``ignore_index`` marks tokens that never count (padding, prompts).
        shift: Predict token ``t + 1`` from position ``t``, as Hugging Face causal LMs do with ``labels=input_ids``
            (the result then has ``T - 1`` columns).
        ignore_index: The label of ignored tokens.

    Returns:
        ``(losses, valid)``, both ``(B, T')``: float32 losses (0 where invalid) and a bool mask.

    Example:
        >>> logits = torch.zeros(1, 3, 4)
        >>> losses, valid = token_losses(logits, torch.tensor([[1, 2, -100]]))
        >>> losses.shape, valid.tolist()
        (torch.Size([1, 2]), [[True, False]])
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ConfigurationError(
            f"token_losses needs logits (B, T, V) and labels (B, T), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="none"
    )
    return flat.view(labels.shape), labels != ignore_index


def token_scores(losses: Tensor, reference_losses: Tensor | None = None, *, score: str = "loss") -> Tensor:
    """The selection score of every token: ``losses``, or ``losses - reference_losses`` for ``"excess_loss"``.

    Example:
        >>> token_scores(torch.tensor([[2.0, 1.0]]), torch.tensor([[1.5, 0.0]]), score="excess_loss")
        tensor([[0.5000, 1.0000]])
    """
    if score not in SCORES:
        raise ConfigurationError(f"`score` must be one of {SCORES}, got {score!r}.")
    losses = losses.detach().float()
    if score == "loss":
        return losses
    if reference_losses is None:
        raise ConfigurationError("score='excess_loss' needs reference losses (L_theta - L_ref); got None.")
    if reference_losses.shape != losses.shape:
        raise ConfigurationError(
            f"reference losses must have the shape of the losses, {tuple(losses.shape)}, got "
            f"{tuple(reference_losses.shape)}. Fix: compute them on the same (shifted) labels."
        )
    return losses - reference_losses.detach().float()


def num_kept_tokens(num_valid: Tensor, keep: float) -> Tensor:
    """How many of ``num_valid`` tokens a ``keep`` fraction keeps: ``round(keep * n)``, at least 1 when ``n > 0``.

    A tensor in, a tensor out (no host-device sync). Rounding is half-to-even, like Python's ``round``.

    Example:
        >>> num_kept_tokens(torch.tensor([10, 1, 0]), 0.25).tolist()
        [2, 1, 0]
    """
    _check_keep(keep)
    n = num_valid.to(torch.float64)
    return torch.minimum(torch.round(n * keep).clamp_min(1.0), n).to(torch.int64)


def select_tokens(scores: Tensor, valid: Tensor, keep: float, *, k: Tensor | None = None) -> Tensor:
    """The mask of kept tokens: the ``k`` valid tokens with the highest score (invalid ones are never kept).

    Ties keep the lower flat (row-major) index. Computed by a stable sort and a rank comparison, so the count
    ``k`` can stay on the device.

    Args:
        scores: Any shape, e.g. ``(B, T)``.
        valid: Bool mask of the same shape; tokens outside it are never kept and never counted.
        keep: The kept fraction of valid tokens, in (0, 1].
        k: Keep exactly this many instead (a 0-dim tensor), e.g. a share of a global selection.

    Returns:
        A bool mask of the shape of ``scores``.
    """
    _check_keep(keep)
    if scores.shape != valid.shape:
        raise ConfigurationError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must have one shape.")
    flat_valid = valid.reshape(-1)
    flat = torch.where(flat_valid, scores.reshape(-1).float(), torch.tensor(-torch.inf, device=scores.device))
    if k is None:
        k = num_kept_tokens(flat_valid.sum(), keep)
    order = torch.sort(flat, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return ((ranks < k) & flat_valid).view(scores.shape)


def masked_token_mean(losses: Tensor, mask: Tensor, *, count: Tensor | None = None) -> Tensor:
    """``sum(losses[mask]) / count`` (``count`` defaults to ``mask.sum()``, at least 1), keeping the gradient.

    Masked-out positions contribute an exact zero, also where their loss is NaN or inf.
    """
    total = torch.where(mask, losses, torch.zeros((), dtype=losses.dtype, device=losses.device)).sum()
    denominator = mask.sum() if count is None else count
    return total / denominator.clamp_min(1).to(losses.dtype)
