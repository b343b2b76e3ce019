"""Which strategies the callbacks accept, and the errors for the others (no processes started).

Strategy objects are built without their ``__init__`` where only their class matters (DeepSpeed is not
installed here; Lightning's FSDPStrategy refuses CPU).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lit_partial import (
    ActivationDetach,
    ActivationMemoryMonitor,
    ConditionalDetach,
    ConditionalSkip,
    GradientMasking,
    LayerFreezing,
    SelectiveBackprop,
    StochasticDepth,
)
from lit_partial.callbacks.base import Technique
from lit_partial.distributed import (
    DEFAULT_FAMILIES,
    check_supported_strategy,
    is_sharded,
    strategy_family,
    tensor_parallel_size,
)
from lit_partial.errors import UnsupportedStrategyError

CALLBACKS = [
    lambda: LayerFreezing(frozen="backbone"),
    lambda: GradientMasking({"head.1.weight": {"kind": "rows", "index": [0]}}),
    lambda: ConditionalDetach({"backbone.0": "always"}),
    lambda: ConditionalSkip({"backbone.0": "always"}),
    lambda: StochasticDepth(blocks="backbone.*"),
    lambda: ActivationDetach(at="backbone.0"),
    lambda: SelectiveBackprop(keep=0.5),
    lambda: ActivationMemoryMonitor(),
]


class _Mesh:
    """A stand-in device mesh with named dimensions of the given sizes."""

    def __init__(self, **sizes: int) -> None:
        self.mesh_dim_names = tuple(sizes)
        self._sizes = sizes

    def __getitem__(self, name: str) -> Any:
        return SimpleNamespace(size=lambda: self._sizes[name])


def trainer_with(cls: type, **attrs: Any) -> Any:
    strategy = cls.__new__(cls)
    for key, value in attrs.items():
        setattr(strategy, key, value)
    return SimpleNamespace(strategy=strategy)


def model_parallel(data: int, tensor: int) -> Any:
    return trainer_with(ModelParallelStrategy, _device_mesh=_Mesh(data_parallel=data, tensor_parallel=tensor))


@pytest.mark.parametrize("make", CALLBACKS)
def test_every_callback_supports_single_ddp_and_fsdp2(make: Any) -> None:
    callback = make()
    assert isinstance(callback, Technique)
    assert set(callback.supported_strategies) >= {"single", "ddp", "fsdp2"}


def test_families_and_sharding() -> None:
    assert DEFAULT_FAMILIES == ("single", "ddp", "fsdp2")
    fsdp2 = model_parallel(2, 1)
    assert strategy_family(fsdp2) == "fsdp2" and is_sharded(fsdp2) and tensor_parallel_size(fsdp2) == 1
    ddp = trainer_with(DDPStrategy)
    assert strategy_family(ddp) == "ddp" and not is_sharded(ddp)
    assert not is_sharded(SimpleNamespace())  # a stand-in trainer without a strategy
    check_supported_strategy(fsdp2, "LayerFreezing")  # accepted


def test_fsdp1_is_refused_naming_model_parallel_strategy_as_the_fix() -> None:
    with pytest.raises(UnsupportedStrategyError, match=r"'fsdp1' \(FSDPStrategy\).*FlatParameters.*") as err:
        check_supported_strategy(trainer_with(FSDPStrategy), "GradientMasking")
    message = str(err.value)
    assert "ModelParallelStrategy(data_parallel_size=" in message and "fully_shard" in message
    assert "supported families: single, ddp, fsdp2" in message


def test_deepspeed_is_refused_naming_the_supported_strategies() -> None:
    with pytest.raises(UnsupportedStrategyError, match="LayerFreezing does not support strategy 'deepspeed'") as err:
        LayerFreezing(frozen="backbone").setup(trainer_with(DeepSpeedStrategy), None, "fit")  # type: ignore[arg-type]
    message = str(err.value)
    assert "supported families: single, ddp, fsdp2" in message
    assert "Trainer(strategy='ddp')" in message and "ModelParallelStrategy" in message


def test_tensor_parallelism_is_refused_clearly() -> None:
    trainer = model_parallel(1, 2)  # what ModelParallelStrategy() means on one node with 2 devices
    assert tensor_parallel_size(trainer) == 2
    with pytest.raises(UnsupportedStrategyError, match=r"tensor_parallel_size=2") as err:
        check_supported_strategy(trainer, "ConditionalDetach")
    message = str(err.value)
    assert "data parallelism (FSDP2) only" in message
    assert "ModelParallelStrategy(data_parallel_size=<devices * num_nodes>, tensor_parallel_size=1)" in message


def test_a_model_parallel_strategy_before_process_setup_counts_as_data_parallel() -> None:
    trainer = trainer_with(ModelParallelStrategy, _device_mesh=None)  # device_mesh raises RuntimeError
    assert tensor_parallel_size(trainer) == 1
