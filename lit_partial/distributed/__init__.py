"""Multi-process helpers: which strategies we support, rank-consistent decisions, and sharded tensors.

A package: ``strategies`` (families, checks, DDP options), ``collectives``, ``dtensor``, ``checkpoint`` (sharded
optimizer state); every name is importable from ``lit_partial.distributed``.

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

from lit_partial.distributed.checkpoint import (
    load_missing_optimizer_state,
)
from lit_partial.distributed.collectives import (
    all_reduce_gradients,
    any_rank,
    broadcast_parameters,
    gather_objects,
    global_statistic,
    holds_on_all_ranks,
    rank,
    world_size,
)
from lit_partial.distributed.dtensor import (
    full_tensor,
    is_dtensor,
    local_tensor,
    shard_like,
)
from lit_partial.distributed.strategies import (
    DEFAULT_FAMILIES,
    FAMILIES,
    SHARDED_FAMILIES,
    allow_unused_parameters,
    check_supported_strategy,
    is_sharded,
    strategy_family,
    tensor_parallel_size,
)
from lit_partial.errors import UnsupportedStrategyError

__all__ = [
    "DEFAULT_FAMILIES",
    "FAMILIES",
    "SHARDED_FAMILIES",
    "UnsupportedStrategyError",
    "all_reduce_gradients",
    "allow_unused_parameters",
    "any_rank",
    "broadcast_parameters",
    "check_supported_strategy",
    "full_tensor",
    "gather_objects",
    "global_statistic",
    "holds_on_all_ranks",
    "is_dtensor",
    "is_sharded",
    "load_missing_optimizer_state",
    "local_tensor",
    "rank",
    "shard_like",
    "strategy_family",
    "tensor_parallel_size",
    "world_size",
]
