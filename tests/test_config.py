"""The generic Hydra helpers of ``lit_partial.config``: schemas generated from constructors and the Trainer."""

from __future__ import annotations

import inspect
from typing import Any

from lit_partial.config import constructor_schema, trainer_schema
from lit_partial.demos import DigitsClassifier, DigitsDataModule


def test_trainer_schema_types() -> None:
    fields = trainer_schema().__dataclass_fields__
    assert "callbacks" not in fields and "logger" not in fields
    assert fields["accumulate_grad_batches"].type is int
    # Union[float, int] must stay Any: 1 (one batch) and 1.0 (all batches) mean different things.
    assert fields["limit_train_batches"].type is Any


def test_constructor_schemas_follow_the_constructors() -> None:
    model = constructor_schema(DigitsClassifier).__dataclass_fields__
    assert set(model) - {"_target_"} == set(inspect.signature(DigitsClassifier).parameters)
    assert model["lr"].type is float and model["num_classes"].type is int
    data = constructor_schema(DigitsDataModule).__dataclass_fields__
    assert set(data) - {"_target_"} == set(inspect.signature(DigitsDataModule).parameters)
