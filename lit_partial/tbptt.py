"""Truncated backpropagation through time: what Lightning 1.x's ``truncated_bptt_steps`` did, for Lightning 2.

A ``(B, T, ...)`` batch is split into chunks of ``k`` time steps. Each chunk runs forward from the hidden
state the previous chunk left, *detached*, so backward never reaches further back than ``k`` steps and the
graph (with its saved activations) covers one chunk at a time: activation memory grows with ``k``, not with
``T``. By default the optimizer steps once per chunk (as in Lightning 1.x); with ``accumulate=True`` the
chunk gradients are accumulated (each chunk loss divided by the number of chunks) and the optimizer steps once
per batch.

Lightning 2 allows several optimizer steps per batch only under manual optimization, so a model sets
``self.automatic_optimization = False`` and its ``training_step`` calls
:meth:`lit_partial.PartialBackpropMixin.tbptt_step` (or :func:`tbptt_training_step`):

    def training_step(self, batch, batch_idx):
        return self.tbptt_step(batch, k=4, step_fn=self.chunk_step)   # mean chunk loss, for logging

    def chunk_step(self, chunk, hiddens):          # chunk: the batch restricted to k time steps
        x, y = chunk
        out, hiddens = self.rnn(x, hiddens)        # hiddens is None for the first chunk
        return F.cross_entropy(self.head(out).flatten(0, 1), y.flatten()), hiddens

Every tensor of the batch whose size along ``time_dim`` equals the sequence length ``T`` (that of the
first such tensor) is split; other tensors (e.g. per-sequence labels of shape ``(B,)``) reach every chunk
whole. :func:`truncated_bptt` is the same loop without Lightning.

The carried state may be any structure :mod:`lit_partial.tree` walks, Hugging Face ``Cache`` objects included:
carrying a transformer's ``past_key_values`` / ``cache`` gives Transformer-XL-style memory (each chunk attends to
the keys and values of the chunks before it, backward stops at the chunk boundary); the carried cache is a
detached copy, so the one the model returned keeps its graph for that chunk's backward. The README's "Hugging
Face and PEFT" section has the GPT-2 version.

Example:
    >>> import torch
    >>> x, y = torch.randn(2, 5, 3), torch.randn(2, 5, 1)
    >>> [tuple(c[0].shape) for c in split_along_time((x, y), k=2)]
    [(2, 2, 3), (2, 2, 3), (2, 1, 3)]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lit_partial.errors import ConfigurationError, IncompatibleModuleError, UsageError
from lit_partial.tree import detach, leaves, map_tensors

__all__ = ["detach_hiddens", "split_along_time", "tbptt_training_step", "truncated_bptt"]

StepFn = Callable[[Any, Any], tuple[Tensor | None, Any]]


def split_along_time(batch: Any, k: int, *, time_dim: int = 1) -> list[Any]:
    """Split every tensor of ``batch`` with the sequence length along ``time_dim`` into chunks of ``k`` steps.

    The last chunk is shorter when ``k`` does not divide ``T``. Chunks are views (no copy).

    Raises:
        ValueError: If ``k`` is not a positive int, or no tensor in ``batch`` has a dimension ``time_dim``.
    """
    if type(k) is not int or k < 1:
        raise ConfigurationError(f"the truncation length `k` must be a positive int (time steps per chunk), got {k!r}.")
    length = next((t.shape[time_dim] for t in leaves(batch, what="batch") if t.dim() > time_dim), None)
    if length is None:
        raise ConfigurationError(
            f"truncated BPTT found no tensor with a time dimension {time_dim} in the batch ({type(batch).__name__}); "
            f"expected tensors shaped (B, T, ...) for time_dim=1. Fix: pass `time_dim=` matching your layout."
        )

    def chunk(start: int) -> Any:
        stop = min(start + k, length)
        return map_tensors(
            batch,
            lambda t: (
                t.narrow(time_dim, start, stop - start) if t.dim() > time_dim and t.shape[time_dim] == length else t
            ),
            what="batch",
        )

    return [chunk(start) for start in range(0, length, k)]


def detach_hiddens(hiddens: Any) -> Any:
    """``hiddens`` detached from the graph: a tensor, or any structure :mod:`lit_partial.tree` handles.

    Tuples (an LSTM's ``(h, c)``), named tuples, lists, dicts, dataclasses and Hugging Face ``Cache`` objects
    (``past_key_values``) are rebuilt with every tensor detached; anything lit_partial cannot look inside is an
    error naming its type, never passed on still attached to the previous chunk's graph.
    """
    return detach(hiddens)


def truncated_bptt(
    batch: Any,
    k: int,
    step_fn: StepFn,
    *,
    backward: Callable[[Tensor], None] = Tensor.backward,
    after_chunk: Callable[[int], None] | None = None,
    hiddens: Any = None,
    time_dim: int = 1,
    loss_scale: float = 1.0,
) -> tuple[Tensor | None, Any]:
    """Run ``step_fn(chunk, hiddens) -> (loss, hiddens)`` over the chunks, backward after each, hiddens detached.

    Args:
        batch: The whole batch, tensors shaped ``(B, T, ...)`` along ``time_dim``.
        k: Time steps per chunk.
        step_fn: Forward of one chunk; returns the chunk loss (``None``: nothing to learn from this chunk) and
            the hidden state to carry on.
        backward: How to backpropagate a loss (``LightningModule.manual_backward`` under Lightning).
        after_chunk: Called with the chunk index after its backward (e.g. an optimizer step).
        hiddens: The initial hidden state (``None``: the model's default).
        time_dim: The time dimension of the batch tensors.
        loss_scale: Multiplies each chunk loss before backward (``1 / num_chunks`` to average accumulated chunks).

    Returns:
        The mean of the chunk losses (detached; ``None`` if no chunk had a loss) and the final hidden state
        (detached).

    Example:
        >>> cell = torch.nn.RNN(3, 4, batch_first=True)
        >>> loss, h = truncated_bptt(torch.randn(2, 6, 3), 2, lambda x, h: (lambda o: (o[0].sum(), o[1]))(cell(x, h)))
        >>> h.shape, h.requires_grad
        (torch.Size([1, 2, 4]), False)
    """
    losses = []
    for index, chunk in enumerate(split_along_time(batch, k, time_dim=time_dim)):
        result = step_fn(chunk, hiddens)
        if not isinstance(result, tuple) or len(result) != 2:
            raise UsageError(
                f"the truncated-BPTT step function must return (loss, hiddens), got {type(result).__name__}. "
                "Fix: `return loss, hiddens` (loss may be None for a chunk without targets)."
            )
        loss, hiddens = result
        if loss is not None:
            backward(loss * loss_scale if loss_scale != 1.0 else loss)
            losses.append(loss.detach())
        # cut the carried state: the next chunk's backward stops here, and this chunk's graph can be freed
        hiddens = detach_hiddens(hiddens)
        if after_chunk is not None:
            after_chunk(index)
    mean = torch.stack(losses).mean() if losses else None
    return mean, hiddens


def tbptt_training_step(
    module: Any,
    batch: Any,
    k: int,
    step_fn: StepFn,
    *,
    accumulate: bool = False,
    hiddens: Any = None,
    time_dim: int = 1,
    gradient_clip_val: float | None = None,
) -> Tensor | None:
    """Truncated BPTT inside a manual-optimization ``training_step`` of ``module``; returns the mean chunk loss.

    Steps the module's (single) optimizer after every chunk, or once after the batch with ``accumulate=True``
    (then each chunk loss is divided by the number of chunks, so the gradient is that of their mean).
    Learning-rate schedulers are the module's business, as always under manual optimization.

    Args:
        module: The LightningModule (``automatic_optimization = False``).
        batch: The batch, tensors shaped ``(B, T, ...)`` along ``time_dim``.
        k: Time steps per chunk.
        step_fn: ``(chunk, hiddens) -> (loss, hiddens)``.
        accumulate: One optimizer step per batch instead of per chunk.
        hiddens: The initial hidden state (``None``: the model's default).
        time_dim: The time dimension of the batch tensors.
        gradient_clip_val: Clip the gradient norm to this value before every optimizer step
            (``Trainer(gradient_clip_val=...)`` is not available under manual optimization).

    Raises:
        RuntimeError: If the module uses automatic optimization or has several optimizers.
        ValueError: If ``gradient_clip_val`` is not a positive number.
    """
    if gradient_clip_val is not None and not (isinstance(gradient_clip_val, int | float) and gradient_clip_val > 0):
        raise ConfigurationError(f"`gradient_clip_val` must be a positive number or None, got {gradient_clip_val!r}.")
    if module.automatic_optimization:
        raise IncompatibleModuleError(
            f"{type(module).__name__} uses automatic optimization, which allows one optimizer step per batch; "
            "truncated BPTT steps once per chunk. Fix: set `self.automatic_optimization = False` in __init__."
        )
    optimizer = module.optimizers()
    if isinstance(optimizer, list):
        raise IncompatibleModuleError(
            f"truncated BPTT steps one optimizer, but configure_optimizers returned {len(optimizer)}. "
            "Fix: return a single optimizer, or write the chunk loop with lit_partial.tbptt.truncated_bptt."
        )
    num_chunks = len(split_along_time(batch, k, time_dim=time_dim))

    def step(index: int) -> None:
        if not accumulate or index == num_chunks - 1:
            if gradient_clip_val is not None:
                module.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm="norm")
            optimizer.step()
            optimizer.zero_grad()

    optimizer.zero_grad()
    loss, _ = truncated_bptt(
        batch,
        k,
        step_fn,
        backward=module.manual_backward,
        after_chunk=step,
        hiddens=hiddens,
        time_dim=time_dim,
        loss_scale=1.0 / num_chunks if accumulate else 1.0,
    )
    return loss
