"""Strategy families: which strategy runs, which ones a technique supports, and making DDP accept changing graphs."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from lit_partial._compat import ddp_kwargs
from lit_partial.errors import UnsupportedStrategyError

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "SHARDED_FAMILIES",
    "allow_unused_parameters",
    "check_supported_strategy",
    "is_sharded",
    "strategy_family",
    "tensor_parallel_size",
]

#: Every strategy family :func:`strategy_family` reports.
FAMILIES: tuple[str, ...] = ("single", "ddp", "fsdp2", "fsdp1", "deepspeed", "other")
#: The families every lit_partial callback supports: single device; DDP in all its launch modes; FSDP2
#: (``ModelParallelStrategy`` with ``tensor_parallel_size=1``).
DEFAULT_FAMILIES: tuple[str, ...] = ("single", "ddp", "fsdp2")
#: The supported families that shard parameters: every rank must issue the same collectives.
SHARDED_FAMILIES: tuple[str, ...] = ("fsdp2",)


def strategy_family(trainer: Any) -> str:
    """The one answer to "which kind of strategy is running": a name from :data:`FAMILIES`.

    ``"ddp"`` covers ``ddp``, ``ddp_spawn``, ``ddp_fork`` and ``ddp_notebook`` (all ``DDPStrategy``),
    ``"fsdp2"`` Lightning's ``ModelParallelStrategy``, ``"fsdp1"`` its ``FSDPStrategy``.
    Decided by ``isinstance`` on Lightning's public strategy classes, never by names.
    """
    from lightning.pytorch.strategies import (
        DDPStrategy,
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
        SingleDeviceStrategy,
    )

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):  # before DDP: DeepSpeedStrategy subclasses DDPStrategy
        return "deepspeed"
    if isinstance(strategy, DDPStrategy):
        return "ddp"
    if isinstance(strategy, ModelParallelStrategy):
        return "fsdp2"
    if isinstance(strategy, FSDPStrategy):
        return "fsdp1"
    if isinstance(strategy, SingleDeviceStrategy):
        return "single"
    return "other"


_WHY = {
    "deepspeed": "DeepSpeed partitions parameters, gradients and optimizer state in its own engine, outside the "
    "Lightning hooks lit_partial acts in",
    "fsdp1": "FSDP1 flattens parameters into FlatParameters, so masks, freezing and per-parameter state would see "
    "flat shards instead of the model's parameters; Lightning's FSDPStrategy also runs on GPUs only",
    "fsdp2": "it shards parameters",
}
_FSDP2_FIX = (
    "ModelParallelStrategy(data_parallel_size=<number of processes>, tensor_parallel_size=1) with "
    "torch.distributed.fsdp.fully_shard applied in the LightningModule's configure_model (FSDP2)"
)


def check_supported_strategy(trainer: Any, who: str, supported: tuple[str, ...] = DEFAULT_FAMILIES) -> None:
    """Raise before training when ``who`` cannot be correct under the trainer's strategy.

    Under ``ModelParallelStrategy`` only data parallelism is supported: a tensor-parallel mesh dimension larger
    than 1 is refused (each rank would hold slices of activations, so statistics, selected samples and byte
    counts would be computed on slices, and tensor-parallel parameters are sharded along dimensions masks do not
    follow yet).

    Args:
        trainer: The Lightning trainer (its strategy's environment is set up: ``Callback.setup`` or later).
        who: The callback's name, for the message.
        supported: Strategy families (see :func:`strategy_family`) ``who`` supports.

    Raises:
        UnsupportedStrategyError: Naming the strategy, the supported families and a fix.
    """
    family = strategy_family(trainer)
    if family in supported:
        if family == "fsdp2":
            _check_data_parallel_only(trainer, who)
        return
    why = f" ({_WHY[family]})" if family in _WHY else ""
    fixes = ["Trainer(strategy='ddp')" if "ddp" in supported else ""]
    fixes.append(_FSDP2_FIX if "fsdp2" in supported else "")
    fix = " or ".join(f for f in fixes if f) or "a single device"
    raise UnsupportedStrategyError(
        f"{who} does not support strategy {family!r} ({type(trainer.strategy).__name__}){why}; supported "
        f"families: {', '.join(supported)}. Fix: use {fix}, or drop {who} from the callbacks."
    )


def _check_data_parallel_only(trainer: Any, who: str) -> None:
    tensor_parallel = tensor_parallel_size(trainer)
    if tensor_parallel > 1:
        raise UnsupportedStrategyError(
            f"{who} supports ModelParallelStrategy for data parallelism (FSDP2) only, but its device mesh has "
            f"tensor_parallel_size={tensor_parallel}: with tensor parallelism each rank holds slices of activations "
            "and parameters, which statistics, sample selection and masks do not follow. (ModelParallelStrategy() "
            "without arguments means tensor_parallel_size = processes per node.) Fix: "
            + _FSDP2_FIX.replace("<number of processes>", "<devices * num_nodes>")
            + "."
        )


def tensor_parallel_size(trainer: Any) -> int:
    """The size of the ``"tensor_parallel"`` dimension of a ``ModelParallelStrategy``'s device mesh (1 if none).

    Needs the strategy's environment to be set up (``Callback.setup`` or later).
    """
    try:
        mesh = getattr(trainer.strategy, "device_mesh", None)
    except RuntimeError:  # Lightning raises when the processes are not initialized yet
        return 1
    names = getattr(mesh, "mesh_dim_names", None) or ()
    return int(mesh["tensor_parallel"].size()) if mesh is not None and "tensor_parallel" in names else 1


def is_sharded(trainer: Any) -> bool:
    """True under a strategy that shards parameters (FSDP2): every rank must then take the same decisions.

    Objects without a ``strategy`` (e.g. a stand-in trainer in a test) count as not sharded.
    """
    return getattr(trainer, "strategy", None) is not None and strategy_family(trainer) in SHARDED_FAMILIES


def allow_unused_parameters(trainer: Any, who: str, reason: str) -> bool:
    """Make a DDP strategy accept steps where some parameters get no gradient; call before the model is wrapped.

    Plain DDP (``find_unused_parameters=False``) raises when a parameter gets no gradient on a step, and hangs
    when ranks disagree about which parameters do. With ``find_unused_parameters=True`` every rank marks
    its unused parameters ready, so the all-reduce completes with zero contributions from those ranks and
    replicas stay identical. ``static_graph=True`` promises the opposite of a changing graph, so it is an error.

    Args:
        trainer: The Lightning trainer (its strategy must not have wrapped the model yet: use ``Callback.setup``).
        who: The callback's name, for the log line.
        reason: Why parameters may go unused, for the log line.

    Returns:
        True when the strategy's options were changed (False when not DDP or already allowed).

    Raises:
        UnsupportedStrategyError: If the strategy was configured with ``static_graph=True``.
    """
    if strategy_family(trainer) != "ddp":  # nothing wraps the model in DDP: every graph is fine
        return False
    kwargs = ddp_kwargs(trainer.strategy)
    if kwargs.get("static_graph"):
        raise UnsupportedStrategyError(
            f"{who} changes which parameters get gradients from step to step ({reason}), but the DDP strategy was "
            "built with static_graph=True, which promises a fixed graph. Fix: drop static_graph=True."
        )
    if kwargs.get("find_unused_parameters"):
        return False
    kwargs["find_unused_parameters"] = True
    rank_zero_info(
        f"{who}: set DDP find_unused_parameters=True ({reason}); without it plain DDP raises on such steps, or hangs "
        "when ranks decide differently. Cost: one autograd-graph traversal per step (see benchmarks/dynamic.py)."
    )
    return True
