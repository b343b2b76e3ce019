"""``FSDP2Strategy``: Lightning's ``ModelParallelStrategy`` sized for data parallelism only, from two numbers.

``ModelParallelStrategy()`` without arguments means tensor parallelism over the devices of a node (and data
parallelism across nodes), which lit_partial refuses; pure FSDP2 needs ``data_parallel_size`` equal to the
number of processes, a product a config file cannot compute. ``FSDP2Strategy(devices, num_nodes)`` does it, so
``conf/trainer/fsdp.yaml`` can pass ``${trainer.devices}`` and ``${trainer.num_nodes}``.

Example:
    >>> strategy = FSDP2Strategy(devices=4, num_nodes=2)
    >>> isinstance(strategy, ModelParallelStrategy)
    True
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from lit_partial.errors import ConfigurationError

__all__ = ["FSDP2Strategy"]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy(data_parallel_size=devices * num_nodes, tensor_parallel_size=1)``.

    The model applies ``torch.distributed.fsdp.fully_shard`` in its ``configure_model`` (see
    ``lit_partial.demos.DigitsClassifier``). Everything else is Lightning's strategy, unchanged.

    Args:
        devices: Processes per node (``trainer.devices``): a positive int.
        num_nodes: Nodes (``trainer.num_nodes``).
        **kwargs: Other ``ModelParallelStrategy`` arguments (``save_distributed_checkpoint``, ``timeout``, ...).

    Raises:
        ConfigurationError: If ``devices`` or ``num_nodes`` is not a positive int.
    """

    def __init__(self, devices: int = 1, num_nodes: int = 1, **kwargs: Any) -> None:
        for name, value in (("devices", devices), ("num_nodes", num_nodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"FSDP2Strategy needs `{name}` as a positive int to size the data-parallel mesh, got {value!r}. "
                    f"Fix: set trainer.{name} to a number, e.g. trainer.{name}=2."
                )
        super().__init__(data_parallel_size=devices * num_nodes, tensor_parallel_size=1, **kwargs)
