"""Resuming a sharded (``ModelParallelStrategy``) checkpoint: optimizer state of parameters trainable again."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lit_partial.distributed.dtensor import shard_like

__all__ = ["load_missing_optimizer_state"]


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
