"""Every private Lightning / torch name lit_partial relies on, in one place.

Each accessor below wraps exactly one private name and says why no public API does the job. Each has a
test in ``tests/test_compat.py`` that fails loudly, naming the attribute and the installed version, when
an upgrade removes or changes it; everything else in lit_partial uses public APIs only.

Example:
    >>> import torch
    >>> t = torch.zeros(2)
    >>> before = version_counter(t)
    >>> _ = t.add_(1)
    >>> version_counter(t) == before + 1
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "DDP_IGNORE_ATTR",
    "HF_CHECKPOINT_FUNC_ATTR",
    "SDPA_OP_NAMES",
    "ddp_ignored_names",
    "ddp_kwargs",
    "foreach_mul_",
    "hf_checkpoint_layers",
    "is_op",
    "is_running_stats_norm",
    "module_class_names",
    "named_tree",
    "non_finite_check_and_unscale_",
    "scaler_found_inf_per_device",
    "sdpa_ops",
    "set_ddp_ignored_names",
    "torch_dispatch_mode",
    "version_counter",
    "view_base",
]

#: ``DistributedDataParallel`` skips the parameters and buffers named in this module attribute when it wraps
#: the module (torch has no public way to exclude parameters; ``_set_params_and_buffers_to_ignore_for_model``
#: is private too and only sets this attribute).
DDP_IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"


def named_tree(model: nn.Module) -> tuple[list[str], list[tuple[str, nn.Parameter]]]:
    """Every module name and every ``(name, parameter)`` pair of ``model``, aliases of shared ones included.

    One traversal reading each module's ``_parameters`` dict: ``named_parameters(remove_duplicate=False)``
    does the same through nested generators and is about 6x slower on a model with 100,000 parameter
    tensors (0.49 s against 0.08 s), which selection pays for every selector list it resolves.
    """
    modules: list[str] = []
    params: list[tuple[str, nn.Parameter]] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            modules.append(name)
        prefix = name + "." if name else ""
        for key, p in module._parameters.items():
            if p is not None:
                params.append((prefix + key, p))
    return modules, params


def module_class_names(cls: type) -> tuple[str, ...]:
    """The class names a module of class ``cls`` answers to: its own, and under FSDP2 the one it had before.

    ``fully_shard`` swaps a module's class for a new ``FSDP<Name>`` with bases ``(FSDPModule, <the class>)``
    (``torch.distributed.fsdp``'s convention, undocumented), so ``class:LlamaDecoderLayer`` still finds the layers
    that techniques resolve again after sharding.
    """
    if not cls.__name__.startswith("FSDP") or not torch.distributed.is_available():
        return (cls.__name__,)
    from torch.distributed.fsdp import FSDPModule

    if not issubclass(cls, FSDPModule):
        return (cls.__name__,)
    return (cls.__name__, *(base.__name__ for base in cls.__bases__ if base is not FSDPModule))


def version_counter(t: Tensor) -> int:
    """``t._version``: bumped by every in-place write. No public API tells whether a tensor was modified."""
    return int(t._version)


def view_base(t: Tensor) -> Tensor | None:
    """``t._base``: the tensor ``t`` is a view of, or None. Public ``is_view`` exists only on some subclasses."""
    base = t._base
    return base if isinstance(base, Tensor) else None


def is_running_stats_norm(module: nn.Module) -> bool:
    """A BatchNorm / InstanceNorm (any dimensionality, lazy and sync variants) that tracks running statistics.

    ``_NormBase`` is their only common base class; listing the public classes would miss subclasses.
    """
    return isinstance(module, _NormBase) and bool(module.track_running_stats)


def foreach_mul_(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> None:
    """``torch._foreach_mul_``: one C++ call (fused where shapes allow) instead of one Python call per tensor."""
    torch._foreach_mul_(list(tensors), list(others))


def non_finite_check_and_unscale_(grads: Sequence[Tensor], found_inf: Tensor, inv_scale: Tensor) -> None:
    """``torch._amp_foreach_non_finite_check_and_unscale_``: GradScaler's own inf/NaN check, reused as is."""
    torch._amp_foreach_non_finite_check_and_unscale_(list(grads), found_inf, inv_scale)


def scaler_found_inf_per_device(scaler: Any, optimizer: torch.optim.Optimizer) -> dict[torch.device, Tensor]:
    """GradScaler's per-device inf flags for ``optimizer`` (``_per_optimizer_states``), or ``{}`` when not unscaled.

    GradScaler exposes no public way to correct its verdict after gradients were masked.

    Raises:
        RuntimeError: If the installed torch's GradScaler no longer has the expected structure (naming it), so a
            silent skip of the correction cannot happen.
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        raise RuntimeError(
            f"torch {torch.__version__}: GradScaler has no `_per_optimizer_states` dict; lit_partial's masked-gradient "
            "overflow check needs updating for this torch version (lit_partial/_compat.py)."
        )
    state = states.get(id(optimizer), {})
    found = state.get("found_inf_per_device", {}) if isinstance(state, dict) else {}
    return dict(found)


def ddp_kwargs(strategy: Any) -> dict[str, Any]:
    """The options Lightning's ``DDPStrategy`` passes to ``DistributedDataParallel`` (``_ddp_kwargs``), mutable.

    Lightning has no public setter; they must change before the model is wrapped (``Callback.setup``).

    Raises:
        RuntimeError: If ``strategy`` lacks the attribute (a Lightning upgrade renamed it), naming the version.
    """
    kwargs = getattr(strategy, "_ddp_kwargs", None)
    if not isinstance(kwargs, dict):
        import lightning

        raise RuntimeError(
            f"lightning {lightning.__version__}: {type(strategy).__name__} has no `_ddp_kwargs` dict; lit_partial "
            "cannot set DDP options before the wrap. lit_partial/_compat.py needs updating for this version."
        )
    return kwargs


def ddp_ignored_names(module: nn.Module) -> list[str]:
    """Names DDP will skip when it wraps ``module`` (see :data:`DDP_IGNORE_ATTR`)."""
    return list(getattr(module, DDP_IGNORE_ATTR, []))


def set_ddp_ignored_names(module: nn.Module, names: Sequence[str]) -> None:
    """Set (or, for an empty list, remove) the names DDP skips when it wraps ``module``."""
    if names:
        setattr(module, DDP_IGNORE_ATTR, list(names))
    elif DDP_IGNORE_ATTR in module.__dict__:
        delattr(module, DDP_IGNORE_ATTR)


#: The fused attention ops ``F.scaled_dot_product_attention`` dispatches to (one per backend; names are private
#: aten ops, so selective-checkpointing policies that save attention outputs list them here). Missing ones are
#: skipped by :func:`sdpa_ops` (a backend compiled out of this torch build).
SDPA_OP_NAMES = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def sdpa_ops() -> list[Any]:
    """The ``torch.ops.aten`` overload packets of :data:`SDPA_OP_NAMES` that this torch build has."""
    return [getattr(torch.ops.aten, name) for name in SDPA_OP_NAMES if hasattr(torch.ops.aten, name)]


def is_op(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch.ops`` op: ``torch._ops.OpOverload`` or ``OpOverloadPacket`` (no public alias)."""
    return isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def torch_dispatch_mode() -> type:
    """``torch.utils._python_dispatch.TorchDispatchMode``: the base of op-level interceptors, with no public alias.

    (``FlopCounterMode`` and ``create_selective_checkpoint_contexts`` are built on it.)
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


#: The attribute through which a Hugging Face ``GradientCheckpointingLayer`` calls its checkpoint function (set by
#: ``gradient_checkpointing_enable()``; transformers has no public way to replace the function of one layer).
HF_CHECKPOINT_FUNC_ATTR = "_gradient_checkpointing_func"


def hf_checkpoint_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The Hugging Face layers of ``model`` with gradient checkpointing enabled (and a checkpoint function set)."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if getattr(m, "gradient_checkpointing", False) is True and HF_CHECKPOINT_FUNC_ATTR in m.__dict__
    ]


def foreach_add_(tensors: Sequence[Tensor], others: Sequence[Tensor]) -> None:
    """``torch._foreach_add_``: add ``others`` into ``tensors`` in one C++ call (AdaptiveFreezing's gradient sums)."""
    torch._foreach_add_(list(tensors), list(others))


__all__ += ["foreach_add_"]


class _GlobalOnly:
    """Stands in for ``FlopCounterMode.mod_tracker``: every FLOP counts under ``"Global"`` only; no hooks."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def total_flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode(display=False)`` that counts the total only and holds no reference into the graph.

    ``FlopCounterMode`` attributes FLOPs to modules with a ``ModuleTracker`` (its ``mod_tracker`` attribute,
    undocumented) that registers a ``register_multi_grad_hook`` on every module's inputs and outputs; each hook's
    closure holds the ``grad_fn`` s it waits for and lives until the mode exits. A graph cut off by a ``.detach()``
    is then kept alive, with everything it saved, until the end of the measurement: the measured step holds the
    activations an unmeasured one frees. Without the tracker the total (``get_total_flops``, the ``"Global"``
    entry) is the same; only the per-module table is lost. No public option turns the tracking off.

    Raises:
        RuntimeError: If the installed torch's ``FlopCounterMode`` no longer has a ``mod_tracker`` (naming the
            version), so the graph-keeping tracker is never silently left in place.
    """
    counter = FlopCounterMode(display=False)
    if not hasattr(counter, "mod_tracker"):
        raise RuntimeError(
            f"torch {torch.__version__}: FlopCounterMode has no `mod_tracker`; lit_partial's FLOP counting that keeps "
            "no graph alive needs updating for this torch version (lit_partial/_compat.py)."
        )
    counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]  # duck-typed: parents, __enter__, __exit__
    return counter


__all__ += ["total_flop_counter"]


def compiled_call_impl(module: nn.Module) -> Any:
    """What ``nn.Module.compile()`` installed on ``module`` (``_compiled_call_impl``, private), or None.

    ``module.compile()`` compiles in place: the module stays itself and only this attribute says so (torch has
    no public ``is_compiled``).
    """
    return getattr(module, "_compiled_call_impl", None)


def lightning_compiler_ctx(module: nn.Module) -> Any:
    """Lightning's record that ``fit`` was given ``torch.compile(model)`` (``LightningModule._compiler_ctx``), or None.

    ``Trainer.fit`` unwraps an ``OptimizedModule`` into the LightningModule it wraps, replaces its ``forward``
    by the compiled one and keeps the original in this private attribute (``lightning.pytorch.utilities.compile``).
    """
    return getattr(module, "_compiler_ctx", None)


def optimized_module_type() -> type:
    """``torch._dynamo.eval_frame.OptimizedModule``: what ``torch.compile(module)`` returns (no public alias)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


def compiled_parts(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that run compiled ("" for ``model`` itself); empty if none does.

    Covers the three ways of compiling a Lightning model: ``model.compile()`` (:func:`compiled_call_impl`),
    ``trainer.fit(torch.compile(model))`` (:func:`lightning_compiler_ctx`) and a submodule replaced by
    ``torch.compile(submodule)`` (an :func:`optimized_module_type`) or compiled in place.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> compiled_parts(model)
        []
        >>> model[0] = torch.compile(model[0])
        >>> compiled_parts(model)
        ['0']
    """
    optimized = optimized_module_type()
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, optimized) or compiled_call_impl(m) is not None or lightning_compiler_ctx(m) is not None
    ]


def activation_memory_budget() -> float:
    """``torch._functorch.config.activation_memory_budget``: the min-cut partitioner's budget (private config).

    What ``torch.compile`` saves for backward in a training graph, as a fraction of what saving every activation
    would keep: 1.0 (torch's default) saves all it does not find cheaper to recompute, 0.0 recomputes as much as
    it can. Read when a training graph is partitioned, i.e. at compile time; no public API sets it.
    """
    import torch._functorch.config as functorch_config

    return float(functorch_config.activation_memory_budget)


def set_activation_memory_budget(budget: float) -> float:
    """Set :func:`activation_memory_budget` for the graphs compiled from now on; returns the previous value."""
    import torch._functorch.config as functorch_config

    previous = float(functorch_config.activation_memory_budget)
    functorch_config.activation_memory_budget = float(budget)
    return previous


__all__ += [
    "activation_memory_budget",
    "compiled_call_impl",
    "compiled_parts",
    "lightning_compiler_ctx",
    "optimized_module_type",
    "set_activation_memory_budget",
]
