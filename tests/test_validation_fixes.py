"""Silent cases that are now errors: numbers as conditions, non-finite `where` values, non-mask files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lit_partial.conditions import Always, Never, parse_condition
from lit_partial.errors import ConditionError, MaskError
from lit_partial.functional.mask_builders import check_mask_source, resolve_mask_source, validate_mask_spec


@pytest.mark.parametrize("spec", [1.0, 0, 1, 0.0, 2, -1.5])
def test_a_bare_number_is_not_a_condition(spec: float) -> None:
    with pytest.raises(
        ConditionError,
        match=r"invalid condition .*: a bare number is not a condition; write true/\"always\" or false/\"never\"",
    ):
        parse_condition(spec)


@pytest.mark.parametrize(("spec", "kind"), [(True, Always), ("always", Always), (False, Never), ("never", Never)])
def test_booleans_and_strings_still_mean_always_and_never(spec: object, kind: type) -> None:
    assert isinstance(parse_condition(spec), kind)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_where_mask_value_must_be_finite(value: float) -> None:
    with pytest.raises(MaskError, match=r"value=.* must be a number, and finite"):
        validate_mask_spec({"kind": "where", "op": ">", "value": value})


def test_mask_file_that_is_text_is_a_mask_error(tmp_path: Path) -> None:
    path = tmp_path / "mask.pt"
    path.write_text("not a tensor file\n")
    source = check_mask_source("head.1", str(path))
    with pytest.raises(MaskError, match=r"is not a torch-saved mask file .*torch.save\(\{parameter_name"):
        resolve_mask_source("head.1", source, "head.1.weight", torch.zeros(2, 2))


def test_mask_file_holding_a_tensor_not_a_dict_is_a_mask_error(tmp_path: Path) -> None:
    path = tmp_path / "mask.pt"
    torch.save(torch.ones(2, 2), path)
    source = check_mask_source("head.1", str(path))
    with pytest.raises(MaskError, match=r"has no mask for parameter 'head.1.weight' .*save a dict keyed by parameter"):
        resolve_mask_source("head.1", source, "head.1.weight", torch.zeros(2, 2))
