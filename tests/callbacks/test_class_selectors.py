"""Every callback takes ``class:`` selectors: selecting by class equals selecting the same modules by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_partial import (
    ActivationDetach,
    ConditionalDetach,
    ConditionalSkip,
    GradientMasking,
    LayerFreezing,
    StochasticDepth,
)
from lit_partial.selectors import SelectorError
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.helpers.models import TinyNet, tiny_loader

#: callback factory, class selector, the same modules by name (TinyNet: stem, blocks.0-2 = FFNBlock, head).
CASES: dict[str, tuple[Callable[[Any], Callback], Any, Any]] = {
    "LayerFreezing": (
        lambda s: LayerFreezing(frozen=s, schedule=[{"step": 2, "unfreeze": s}]),
        "class:FFNBlock",
        "blocks.*",
    ),
    "GradientMasking": (
        lambda s: GradientMasking({s: {"kind": "random", "keep": 0.5, "seed": 0}}),
        "class:lit_partial.demos.models.FFNBlock",
        "blocks.*",
    ),
    "ConditionalDetach": (lambda s: ConditionalDetach({s: {"steps": [0, 3]}}), "class:FFNBlock", "blocks.*"),
    "ConditionalSkip": (lambda s: ConditionalSkip({s: {"probability": 0.5}}), "class:FFNBlock", "blocks.*"),
    "StochasticDepth": (lambda s: StochasticDepth(blocks=s, drop_rate=0.5), "class:FFNBlock", "blocks.*"),
    "ActivationDetach": (lambda s: ActivationDetach(at=s), ["class:FFNBlock", "stem"], ["stem", "blocks.*"]),
}


def fit(callbacks: list[Callback]) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    quiet_trainer(max_steps=6, callbacks=callbacks).fit(model, tiny_loader())
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_a_class_selector_acts_exactly_as_the_names_of_the_same_modules(name: str) -> None:
    make, by_class, by_name = CASES[name]
    selected = fit([make(by_class)])
    assert_states_bitwise_equal(fit([make(by_name)]).state_dict(), selected.state_dict())
    untouched = fit([])
    assert any(not torch.equal(a, b) for a, b in zip(untouched.parameters(), selected.parameters(), strict=True))


@pytest.mark.parametrize("name", list(CASES))
def test_an_unknown_class_fails_in_setup_naming_close_classes(name: str) -> None:
    make, _, _ = CASES[name]
    model = TinyNet()
    with pytest.raises(
        SelectorError, match=r"'class:FFNBlok' matched no module of TinyNet; did you mean 'class:FFNBlock'"
    ):
        quiet_trainer(max_steps=1, callbacks=[make("class:FFNBlok")]).fit(model, tiny_loader())
    assert model.global_step == 0
