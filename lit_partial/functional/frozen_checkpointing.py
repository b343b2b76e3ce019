"""Checkpointing that knows what is frozen: Hugging Face's gradient checkpointing, made to skip frozen layers.

transformers #21381 (and #42489, open): with a frozen prefix (embeddings, bottom layers) and gradient checkpointing,
reentrant checkpointing gives trainable layers no gradient, because their inputs do not require one; the usual fix,
``enable_input_require_grads()`` (which ``gradient_checkpointing_enable()`` calls), makes every hidden state require a
gradient, so backward runs through - and recomputes - every frozen layer below the first one that trains. BAdam and
LLaMA-Factory patch the checkpoint function instead. :func:`frozen_aware_checkpointing` does that for every
checkpointed layer, exactly:

* a layer with nothing trainable at or below it (no parameter of it, nor of anything registered before it) runs
  plainly on detached inputs: no checkpoint, no graph, no recomputation;
* a trainable layer with nothing trainable below it is checkpointed on detached inputs (set to require a gradient
  when the checkpoint function is reentrant, which needs one), so backward stops there;
* every other layer is checkpointed as Hugging Face would.

Gradients equal those of training without checkpointing. lit_partial's own checkpointing
(``ActivationDetach(checkpoint=...)``, non-reentrant) already runs calls that need no gradient plainly.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> frozen_aware_checkpointing(layer).remove()  # no Hugging Face layer with checkpointing: nothing to patch
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from lit_partial._compat import HF_CHECKPOINT_FUNC_ATTR, hf_checkpoint_layers
from lit_partial.handles import Handle, Handles
from lit_partial.tree import detach

__all__ = ["frozen_aware_checkpointing"]


def _is_reentrant(func: Any) -> bool:
    keywords = getattr(func, "keywords", None) or {}
    return bool(keywords.get("use_reentrant", False))


def frozen_aware_checkpointing(model: nn.Module) -> Handles:
    """Replace the checkpoint function of each checkpointed Hugging Face layer by a frozen-aware one, until removed.

    What trains is asked at every call (a freezing schedule may change it): a layer's own parameters, then those
    registered before it, stopping at the first that trains.

    Args:
        model: A model holding Hugging Face layers on which ``gradient_checkpointing_enable()`` was called.

    Returns:
        Handles restoring each layer's own checkpoint function (unless something replaced it since).
    """
    handles = Handles()
    params = [p for _, p in model.named_parameters()]
    position = {id(p): i for i, p in reversed(list(enumerate(params)))}
    for _, layer in hf_checkpoint_layers(model):
        own = list(layer.parameters())
        first = min((position[id(p)] for p in own if id(p) in position), default=0)
        below = params[:first]
        original = layer.__dict__[HF_CHECKPOINT_FUNC_ATTR]
        shim = _shim(original, own, below)
        layer.__dict__[HF_CHECKPOINT_FUNC_ATTR] = shim

        def undo(layer: nn.Module = layer, original: Any = original, shim: Any = shim) -> None:
            if layer.__dict__.get(HF_CHECKPOINT_FUNC_ATTR) is shim:
                layer.__dict__[HF_CHECKPOINT_FUNC_ATTR] = original

        handles.add(Handle(undo))
    return handles


def _shim(original: Callable[..., Any], own: Sequence[Tensor], below: Sequence[Tensor]) -> Callable[..., Any]:
    reentrant = _is_reentrant(original)

    @functools.wraps(original)
    def checkpoint_unless_frozen(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if any(p.requires_grad for p in below):
            return original(func, *args, **kwargs)
        inputs = detach(args)  # nothing below trains: the gradient of the inputs is never needed
        if not any(p.requires_grad for p in own):
            return func(*inputs, **kwargs)
        if reentrant and inputs and isinstance(inputs[0], Tensor) and inputs[0].is_floating_point():
            inputs = (inputs[0].requires_grad_(True), *inputs[1:])
        return original(func, *inputs, **kwargs)

    return checkpoint_unless_frozen
