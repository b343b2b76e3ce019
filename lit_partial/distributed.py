"""Multi-process helpers: which strategies we support, rank-consistent decisions, and sharded tensors.

Decisions that change the autograd graph must agree across ranks. Random decisions are
seeded from the global step (:mod:`lit_partial.conditions`), so they agree by construction; the helpers
here cover what has to be communicated.

Two families of multi-process strategies are supported:

* **DDP** (``strategy="ddp"``, ``"ddp_spawn"``, ...): every rank holds every parameter. A decision taken
  differently per rank is safe (DDP runs with ``find_unused_parameters=True`` where needed, see
  :func:`allow_unused_parameters`).
* **FSDP2** (Lightning's ``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``, data
  parallelism only): ``fully_shard`` replaces each parameter by a ``DTensor`` parameter holding this rank's
  shard, and every forward/backward issues all-gathers and reduce-scatters per sharded module. Ranks that
  decide differently whether a module runs or gets a gradient issue different collectives and hang, so under
  this family every graph-changing decision that depends on per-rank data is reduced first
  (:meth:`lit_partial.conditions.Condition.agreed`: a statistic is computed over all ranks' activations). Masks
  and other per-parameter tensors are sharded like their parameter (:func:`shard_like`), and the tensor kernels work
  on the local shards (:func:`local_tensor`).

Lightning call order, which the callbacks rely on: ``Callback.setup`` runs before
``LightningModule.configure_model`` (so before ``fully_shard``, and before DDP wraps the model);
``on_fit_start`` runs once the strategy has set up the model and the optimizers; a checkpoint is restored
before the strategy's setup under DDP, but after ``on_fit_start`` under ``ModelParallelStrategy``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lit_partial._compat import ddp_kwargs
from lit_partial.errors import UnsupportedStrategyError

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "SHARDED_FAMILIES",
    "UnsupportedStrategyError",
    "check_supported_strategy",
    "is_sharded",
    "strategy_family",
    "world_size",
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


def world_size() -> int:
    """The number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# --- gradients and parameters DDP does not know about (LayerFreezing) ---------------------------------------


def all_reduce_gradients(params: Sequence[torch.Tensor]) -> int:
    """Average the gradients of ``params`` over all ranks in ONE coalesced all-reduce, as DDP would.

    For parameters DDP never registered (e.g. unfrozen after the model was wrapped). A parameter whose
    gradient is ``None`` on some ranks counts as zero there, like DDP's unused parameters; one that has no
    gradient on any rank keeps ``.grad = None`` (optimizers then skip it). Every rank must pass the same
    parameters in the same order. A no-op (returning 0) when not distributed.

    Returns:
        The number of gradient elements reduced.
    """
    size = world_size()
    if size == 1 or not params:
        return 0
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    # One buffer holds every gradient plus one presence flag per parameter: a single collective per step.
    flat = torch.cat([g.reshape(-1).to(torch.float32 if g.dtype.is_floating_point else g.dtype) for g in grads])
    flat = torch.cat([flat, present.to(flat.dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    counts = flat[-len(params) :]
    offset = 0
    for p, g, count in zip(params, grads, counts.tolist(), strict=True):
        n = g.numel()
        if count > 0:
            reduced = flat[offset : offset + n].view_as(g).div_(size).to(g.dtype)
            if p.grad is None:
                p.grad = reduced.clone()
            else:
                p.grad.copy_(reduced)
        offset += n
    return offset


def broadcast_parameters(params: Sequence[torch.Tensor], src: int = 0) -> None:
    """Copy ``params`` from rank ``src`` to every rank in one coalesced broadcast (no-op when not distributed).

    For parameters excluded from DDP (:func:`lit_partial._compat.set_ddp_ignored_names`), which DDP does not
    broadcast when it wraps the model.
    """
    if world_size() == 1 or not params:
        return
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.broadcast(flat, src=src)
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


__all__ += ["all_reduce_gradients", "broadcast_parameters"]


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
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(
        f"{who}: set DDP find_unused_parameters=True ({reason}); without it plain DDP raises on such steps, or hangs "
        "when ranks decide differently. Cost: one autograd-graph traversal per step (see benchmarks/dynamic.py)."
    )
    return True


__all__ += ["allow_unused_parameters"]


# --- sharded tensors (FSDP2 DTensor parameters) ------------------------------------------------------------


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (e.g. a parameter after ``fully_shard``)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view sharing its storage and version counter), or ``t`` itself.

    In-place writes to the result (under ``torch.no_grad()``) write the DTensor's local shard.
    """
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]  # a DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (an all-gather: call it on every rank), or ``t`` itself."""
    if not is_dtensor(t):
        return t
    if t.dtype == torch.bool:  # gloo cannot gather bool
        return t.to(torch.uint8).full_tensor().bool()  # type: ignore[attr-defined,no-any-return]  # a DTensor
    return t.full_tensor()  # type: ignore[attr-defined,no-any-return]  # a DTensor


def shard_like(t: torch.Tensor, param: torch.Tensor, *, src_data_rank: int | None = 0) -> torch.Tensor:
    """``t`` (a full tensor that broadcasts to the full ``param``) sharded like the DTensor ``param``.

    Each sharded dimension of ``param`` shards the matching dimension of ``t`` (aligned from the right, as
    broadcasting aligns them); where ``t`` has size 1 in that dimension (or lacks it) it is replicated, so the
    local shard of ``t`` broadcasts to the local shard of ``param``. A mask ``(rows, 1)`` for a row-sharded
    weight ``(rows, cols)`` is sharded by rows; a column mask ``(1, cols)`` is replicated.

    Args:
        t: The full tensor (any device; it is moved to the mesh's device type).
        param: A DTensor parameter; a plain tensor returns ``t`` unchanged.
        src_data_rank: The rank whose ``t`` is scattered to all (``0``: what rank 0 built wins, as with a
            broadcast; a collective, call on every rank). ``None``: every rank takes its own shard of its own
            ``t`` without communication (for a ``t`` that is identical on every rank by construction).
    """
    if not is_dtensor(param):
        return t
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = param.device_mesh  # type: ignore[attr-defined]  # a DTensor
    offset = param.dim() - t.dim()
    placements: list[Any] = []
    for placement in param.placements:  # type: ignore[attr-defined]  # a DTensor
        dim = (placement.dim % param.dim()) - offset if isinstance(placement, Shard) else -1
        placements.append(Shard(dim) if dim >= 0 and t.shape[dim] != 1 else Replicate())
    source = t.detach().to(mesh.device_type)
    as_bool = source.dtype == torch.bool
    if as_bool and src_data_rank is not None:
        source = source.to(torch.uint8)  # gloo cannot scatter or broadcast bool
    sharded = distribute_tensor(source, mesh, placements, src_data_rank=src_data_rank)
    return sharded.bool() if as_bool and sharded.dtype != torch.bool else sharded


__all__ += ["full_tensor", "is_dtensor", "local_tensor", "shard_like", "tensor_parallel_size"]


# --- decisions every rank takes the same way (sharded strategies) ------------------------------------------


def global_statistic(stat: str, x: torch.Tensor) -> torch.Tensor:
    """A statistic of the union of every rank's ``x`` (one small all-reduce; call on every rank).

    Equals the statistic of all ranks' tensors concatenated, as one process holding the whole global batch
    would compute it (in float64, so it may differ from a float32 single-process value in the last bits).

    Args:
        stat: One of ``"mean"``, ``"abs_mean"``, ``"max"``, ``"min"``, ``"std"`` (unbiased), ``"norm"``.
        x: This rank's tensor (any shape; may be empty on some ranks).

    Returns:
        A 0-d float64 tensor on ``x``'s device, identical on every rank.
    """
    x = x.detach().to(torch.float64)
    if stat in ("max", "min"):
        fill = float("-inf") if stat == "max" else float("inf")
        value = (x.max() if stat == "max" else x.min()) if x.numel() else x.new_tensor(fill)  # float64 on all ranks
        if world_size() > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX if stat == "max" else dist.ReduceOp.MIN)
        return value
    total = x.abs().sum() if stat == "abs_mean" else x.sum()
    sums = torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device), total, (x * x).sum()])
    if world_size() > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    n, s, ss = sums.unbind()
    if stat in ("mean", "abs_mean"):
        return s / n
    if stat == "norm":
        return ss.sqrt()
    if stat == "std":
        return ((ss - s * s / n).clamp_min(0.0) / (n - 1)).sqrt()
    raise ValueError(f"unknown statistic {stat!r}; expected mean, abs_mean, max, min, std or norm.")


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """Whether ``flag`` is True on some rank (one all-reduce; call on every rank). ``flag`` when not distributed.

    Args:
        flag: This rank's value.
        device: Where the collective's tensor lives (default: the device of the default group's backend).
    """
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor([float(flag)], device=device if device is not None else _collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def holds_on_all_ranks(condition: Any, ctx: Any, x: torch.Tensor | None, salt: str = "") -> bool:
    """Decide ``condition`` once for all ranks (call on every rank): ``condition.agreed(ctx, x, salt=salt)``.

    Kept for its import path; the behaviour lives on each condition (:meth:`lit_partial.conditions.Condition.agreed`).
    """
    return bool(condition.agreed(ctx, x, salt=salt))


def _collective_device() -> torch.device:
    """The device collectives of the default group run on (``cuda`` for NCCL, else ``cpu``)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ += ["any_rank", "global_statistic", "holds_on_all_ranks"]


# --- per-rank state in checkpoints -------------------------------------------------------------------------


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``all_gather_object``: a collective, call it on every rank).

    For state that differs per rank (e.g. a rank's own samples) in a checkpoint, which Lightning writes from
    rank 0 only: each callback ``state_dict`` call happens on every rank when Lightning saves. Tensors are
    moved to the CPU first, so the result unpickles on any rank. ``[obj]`` when not distributed.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    obj = move_data_to_device(obj, torch.device("cpu"))
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


__all__ += ["gather_objects", "rank"]


# --- resuming a sharded checkpoint --------------------------------------------------------------------------


def load_missing_optimizer_state(model: torch.nn.Module, optimizers: Sequence[Any], path: Any) -> list[str]:
    """Load the optimizer state of parameters that have none now from a ``ModelParallelStrategy`` checkpoint.

    Lightning's ``ModelParallelStrategy`` restores a checkpoint before callbacks restore their state, into a
    template of the optimizer state that exists at that moment (``torch.distributed.checkpoint`` initializes it
    with one zero-gradient step of the parameters that require gradients). A parameter that was frozen at fit
    start but trained before the checkpoint (unfrozen by a schedule) has no state then, so its saved moments are
    silently dropped. Call this after making the parameters trainable again: it reads exactly those entries from
    the checkpoint, shards them like their parameters and sets them. A collective: call it on every rank, with
    the same parameters missing on every rank.

    Args:
        model: The sharded LightningModule (parameter names as in the checkpoint).
        optimizers: ``trainer.optimizers``, in order (Lightning saves them as ``optimizer_0``, ``optimizer_1``, ...).
        path: The checkpoint: a folder of shards (``save_distributed_checkpoint=True``, the default; only the
            entries needed are read, resharded to this run's layout) or a single file (full state, read on every
            rank, as Lightning reads it).

    Returns:
        The names of the parameters whose state was loaded.
    """
    from pathlib import Path

    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    source = Path(path) if path is not None else None
    if source is None or not source.exists():
        return []
    names = {id(p): n for n, p in model.named_parameters()}
    full = None if source.is_dir() else torch.load(source, mmap=True, map_location="cpu", weights_only=False)
    loaded: list[str] = []
    for index, optimizer in enumerate(optimizers):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        missing = {names[id(p)]: p for p in params if id(p) in names and p not in optimizer.state}
        if not missing:
            continue
        if full is None:
            found = _read_sharded_optimizer_entries(source, f"optimizer_{index}", missing)
        else:
            found = _full_optimizer_entries(full["optimizer_states"][index], model, missing)
        if not found:
            continue
        state = get_optimizer_state_dict(model, optimizer)
        state["state"].update(found)  # type: ignore[union-attr]  # "state" maps parameter names to dicts
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state)
        loaded += sorted(found)
    return loaded


def _read_sharded_optimizer_entries(folder: Any, key: str, missing: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The saved ``{name: {state key: value}}`` of ``missing`` parameters, read from a checkpoint folder."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    metadata = FileSystemReader(str(folder)).read_metadata()
    template: dict[str, dict[str, Any]] = {}
    for flat, where in metadata.planner_data.items():
        if len(where) != 4 or where[0] != key or where[1] != "state" or where[2] not in missing:
            continue
        entry = metadata.state_dict_metadata[flat]
        param = missing[where[2]]
        if not isinstance(entry, TensorStorageMetadata):
            value: Any = None  # a pickled value: read as is
        elif tuple(entry.size) == tuple(param.shape):  # a moment: sharded like its parameter
            value = torch.empty_like(param, dtype=entry.properties.dtype)
        else:  # e.g. Adam's step counter
            value = torch.empty(entry.size, dtype=entry.properties.dtype)
        template.setdefault(where[2], {})[where[3]] = value
    if template:
        wrapped = {key: {"state": template}}
        dcp_load(wrapped, checkpoint_id=str(folder))
        template = wrapped[key]["state"]
    return template


def _full_optimizer_entries(saved: dict[str, Any], model: torch.nn.Module, missing: dict[str, Any]) -> dict[str, Any]:
    """The ``{name: {state key: value}}`` of ``missing`` parameters from a full optimizer state, sharded locally."""
    states = saved.get("state", {})
    if states and isinstance(next(iter(states)), int):  # saved keyed by parameter index: rekey by name
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        states = FullyShardedDataParallel.rekey_optim_state_dict(saved, OptimStateKeyType.PARAM_NAME, model)["state"]
    found: dict[str, Any] = {}
    for name, entries in states.items():
        if name in missing:
            param = missing[name]
            found[name] = {
                k: shard_like(v, param, src_data_rank=None)  # every rank read the same file: no communication
                if torch.is_tensor(v) and tuple(v.shape) == tuple(param.shape)
                else v
                for k, v in entries.items()
            }
    return found


__all__ += ["load_missing_optimizer_state"]
