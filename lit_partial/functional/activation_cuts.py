"""Spend less activation memory: detach module outputs, recompute modules in backward, offload to host.

Three mechanisms, each attached to selected submodules and removable through the returned handle:

* :func:`detach_outputs` - a forward hook returns ``output.detach()``, so the graph below the module is
  unreachable from the loss and freed with everything it saved (the module and all before it get no gradient).
* :func:`checkpoint_modules` - the module's ``forward`` runs under ``torch.utils.checkpoint.checkpoint``
  (non-reentrant, RNG state preserved): only its inputs are kept, the rest is recomputed in backward, and
  gradients are bit-identical to the plain run. BatchNorm running statistics are restored after the
  recomputation so they are updated once per step, not twice; a module that modifies its input in place
  (recomputing it would read the modified input) raises :class:`UnsafeCheckpointError` naming it.
* :func:`offload_modules` - saved tensors of the module go to (pinned) host memory via
  ``torch.autograd.graph.save_on_cpu`` and come back for backward.

Example:
    >>> import torch
    >>> from lit_partial.demos import ResidualFFN
    >>> from lit_partial.functional import saved_activation_bytes
    >>> model, x = ResidualFFN(num_blocks=4, width=8), torch.randn(2, 8)
    >>> saved_activation_bytes(lambda: model(x).sum())  # every block keeps its input and its ReLU output
    512
    >>> handle = checkpoint_modules(model, "blocks.*")   # only the block inputs stay
    >>> saved_activation_bytes(lambda: model(x).sum())
    256
    >>> handle.remove()
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lit_partial._compat import version_counter
from lit_partial.errors import ConfigurationError, UnsafeCheckpointError
from lit_partial.functional.freezing import norm_layers
from lit_partial.functional.selective_checkpoint import Policy, selective_context_fn
from lit_partial.handles import Handles, wrap_forward
from lit_partial.selectors import Selectors, outermost, select_modules
from lit_partial.tree import detach, leaves

__all__ = [
    "Handles",
    "UnsafeCheckpointError",
    "checkpoint_modules",
    "detach_outputs",
    "needs_no_grad",
    "offload_modules",
    "resolve_segments",
]

When = Callable[[str, Any], bool]
ContextFn = Callable[[], tuple[Any, Any]]
Segments = int | str | None


def detach_outputs(model: nn.Module, selectors: Selectors, *, when: When | None = None) -> Handles:
    """Detach the outputs of the selected modules (when ``when(name, output)`` holds, default always).

    Args:
        model: The model holding the modules.
        selectors: Which modules (see :mod:`lit_partial.selectors`).
        when: Optional predicate ``(module_name, output) -> bool`` deciding per call.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> handle = detach_outputs(model, "0")
        >>> model(torch.randn(3, 2)).sum().backward()
        >>> model[0].weight.grad is None, model[1].weight.grad is not None
        (True, True)
        >>> handle.remove()
    """
    handles = Handles()
    for name, module in select_modules(model, selectors):

        def hook(mod: nn.Module, args: Any, output: Any, name: str = name) -> Any:
            if when is not None and not when(name, output):
                return None
            return detach(output)

        handles.add(module.register_forward_hook(hook))
    return handles


def resolve_segments(segments: Segments, length: int) -> int:
    """The number of segments for a Sequential of ``length`` children: an int, or ``"sqrt"`` = round(sqrt(N))."""
    count = max(1, round(math.sqrt(length))) if segments == "sqrt" else int(segments or 1)
    return min(count, length)


@contextlib.contextmanager
def _running_stats_restored(norms: list[nn.Module]) -> Iterator[None]:
    """Undo the running-statistics update of these BatchNorm layers (the recomputation's second one)."""
    saved = [(b, b.clone()) for m in norms if m.training for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _recomputable(fn: Callable[..., Any], module: nn.Module, name: str, norms: list[nn.Module]) -> Callable[..., Any]:
    """``fn`` for one checkpointed call: the first run checks for in-place input edits, reruns restore BN stats."""
    first = True

    def run(*args: Any, **kwargs: Any) -> Any:
        nonlocal first
        if not first:
            if not norms:
                return fn(*args, **kwargs)
            with _running_stats_restored(norms):
                return fn(*args, **kwargs)
        first = False
        inputs = leaves((args, kwargs))
        versions = [version_counter(t) for t in inputs]
        out = fn(*args, **kwargs)
        if any(version_counter(t) != v for t, v in zip(inputs, versions, strict=True)):
            raise UnsafeCheckpointError(
                f"checkpointed module {name!r} ({type(module).__name__}) modified its input in place, so recomputing "
                "it in backward would start from the modified input and give wrong gradients. Fix: remove it from "
                "`checkpoint`, or make the op out-of-place (e.g. nn.ReLU(inplace=False), x = x + y instead of x += y)."
            )
        return out

    return run


def _checkpointed(run: Callable[..., Any], *args: Any, context_fn: ContextFn | None = None, **kwargs: Any) -> Any:
    if context_fn is not None:  # selective checkpointing: the policy's ops are saved, the rest recomputed
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn, **kwargs)
    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


#: Keyword arguments through which Hugging Face layers write a KV cache; a checkpointed call gets them as None (and
#: ``use_cache=False``), as transformers' own gradient checkpointing does: the recomputation would write it again.
CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    if not any(kwargs.get(key) is not None for key in CACHE_KWARGS) and not kwargs.get("use_cache"):
        return kwargs
    out = {key: (None if key in CACHE_KWARGS else value) for key, value in kwargs.items()}
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def needs_no_grad(params: Sequence[Tensor], args: Any, kwargs: Any) -> bool:
    """Whether a call builds no graph: none of the module's ``params`` and no input tensor requires grad.

    Such a call has nothing to recompute for, so checkpointing runs it plainly (the rule that makes freezing and
    checkpointing compose: transformers #21381/#42489, LLaMA-Factory's and BAdam's checkpointing patches). It
    stops at the first parameter that trains, so a trainable module costs one flag read.

    Example:
        >>> layer = nn.Linear(2, 2).requires_grad_(False)
        >>> needs_no_grad(list(layer.parameters()), (torch.randn(1, 2),), {})
        True
    """
    if any(p.requires_grad for p in params):
        return False
    return not any(t.requires_grad for t in leaves((args, kwargs)))


def checkpoint_modules(
    model: nn.Module,
    selectors: Selectors,
    *,
    segments: Segments = None,
    enabled: Callable[[], bool] | None = None,
    policy: Policy | None = None,
    skip_frozen: bool = True,
) -> Handles:
    """Recompute the selected modules in backward instead of keeping their activations.

    Nested selections collapse to the outermost module. Recomputation happens only while grad is enabled
    and ``enabled()`` holds, so evaluation under ``no_grad`` runs the plain forward. A call in which neither the
    module's parameters nor its inputs require grad runs plainly too (nothing to recompute for; ``skip_frozen``).
    Checkpointed calls get ``use_cache=False`` and no KV cache (:data:`CACHE_KWARGS`), as under transformers' own
    gradient checkpointing: recomputing a layer must not write its cache a second time.

    Args:
        model: The model holding the modules.
        selectors: Which modules to checkpoint.
        segments: For a selected ``nn.Sequential``: checkpoint it as this many consecutive pieces (each keeps
            only its input), or ``"sqrt"`` for round(sqrt(len)); ``None`` checkpoints each module whole.
        enabled: Optional switch asked at every call (the callback turns it on for training steps only).
        policy: Selective checkpointing: the ops whose outputs are saved (see
            :mod:`lit_partial.functional.selective_checkpoint`: ``"matmul"``, op names, or a policy function);
            ``None`` saves nothing but the inputs.
        skip_frozen: Run calls that need no gradient plainly (each call checks the module's parameters' flags).

    Raises:
        ValueError: If ``segments`` is given and a selected module is not an ``nn.Sequential``.
    """
    named = dict(select_modules(model, selectors))
    chosen = [(n, named[n]) for n in outermost(named)]
    if segments is not None:
        not_sequential = [f"{n!r} ({type(m).__name__})" for n, m in chosen if not isinstance(m, nn.Sequential)]
        if not_sequential:
            raise ConfigurationError(
                f"`segments={segments!r}` splits an nn.Sequential into pieces, but these selected modules are not "
                f"nn.Sequential: {', '.join(not_sequential)}. Fix: select the Sequential itself (e.g. 'blocks'), or "
                "drop `segments`."
            )
    context_fn = selective_context_fn(policy) if policy is not None else None
    handles = Handles()
    for name, module in chosen:
        pieces = resolve_segments(segments, len(module)) if isinstance(module, nn.Sequential) else 0
        wrapper = _checkpoint_wrapper(module, name, pieces, enabled, context_fn, skip_frozen)
        handles.add(wrap_forward(module, wrapper))
    return handles


def _checkpoint_wrapper(
    module: nn.Module,
    name: str,
    pieces: int,
    enabled: Callable[[], bool] | None,
    context_fn: ContextFn | None = None,
    skip_frozen: bool = False,
) -> Callable[..., Any]:
    pieces_of = _split(module, pieces) if pieces and isinstance(module, nn.Sequential) else []
    split = [(piece, f"{name}[{span}]", norm_layers(piece)) for piece, span in pieces_of]
    norms = norm_layers(module)  # BatchNorm layers are found once; whether they are in train mode is asked per call
    params = list(module.parameters())  # found once; whether they train is asked per call (schedules change it)
    run_checkpoint = functools.partial(_checkpointed, context_fn=context_fn) if context_fn else _checkpointed

    def wrapper(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or (enabled is not None and not enabled()):
            return forward(*args, **kwargs)
        if skip_frozen and needs_no_grad(params, args, kwargs):
            return forward(*args, **kwargs)
        kwargs = _without_cache(kwargs)
        if torch.compiler.is_compiling():
            # Dynamo traces a checkpointed function once, as a higher-order op, and the recomputation replays that
            # graph (buffers are updated once); the eager-only checks of _recomputable are neither traceable nor needed.
            if not split:
                return run_checkpoint(forward, *args, **kwargs)
            (x,) = args
            for piece, _, _ in split:
                x = run_checkpoint(piece, x)
            return x
        if not split:
            return run_checkpoint(_recomputable(forward, module, name, norms), *args, **kwargs)
        (x,) = args  # nn.Sequential.forward takes exactly one input
        for piece, piece_name, piece_norms in split:
            x = run_checkpoint(_recomputable(piece, piece, piece_name, piece_norms), x)
        return x

    return wrapper


def _split(seq: nn.Sequential, pieces: int) -> list[tuple[nn.Sequential, str]]:
    """Consecutive pieces of ``seq`` (sharing its children) with their index spans ``"a:b"``."""
    children = list(seq)
    size, extra = divmod(len(children), pieces)
    out, start = [], 0
    for i in range(pieces):  # the first `extra` pieces get one more child, like numpy.array_split
        stop = start + size + (i < extra)
        out.append((nn.Sequential(*children[start:stop]), f"{start}:{stop}"))
        start = stop
    return out


def offload_modules(
    model: nn.Module, selectors: Selectors, *, pin_memory: bool = True, enabled: Callable[[], bool] | None = None
) -> Handles:
    """Keep the tensors the selected modules save for backward in host memory (``save_on_cpu``).

    Args:
        model: The model holding the modules.
        selectors: Which modules.
        pin_memory: Use pinned host memory (asynchronous copies); ignored when CUDA is unavailable.
        enabled: Optional switch asked at every call.
    """
    pin = pin_memory and torch.cuda.is_available()
    handles = Handles()
    named = dict(select_modules(model, selectors))

    def wrapper(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or (enabled is not None and not enabled()):
            return forward(*args, **kwargs)
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return forward(*args, **kwargs)

    for name in outermost(named):
        handles.add(wrap_forward(named[name], wrapper))
    return handles
