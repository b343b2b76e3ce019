"""``class:`` selectors on a Hugging Face Llama built from a config: the names a user thinks in, layer classes."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch

from lit_partial import ConditionalSkip
from lit_partial.selectors import SelectorError, select_modules, select_parameters
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.hf._models import HFModule, build, loader
from tests.hf.test_layerdrop import STEPS, hand_written

pytestmark = pytest.mark.hf

LAYERS = ["model.layers.0", "model.layers.1"]
NORMS = [
    "model.layers.0.input_layernorm",
    "model.layers.0.post_attention_layernorm",
    "model.layers.1.input_layernorm",
    "model.layers.1.post_attention_layernorm",
    "model.norm",
]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("class:LlamaDecoderLayer", LAYERS),
        ("class:transformers.models.llama.modeling_llama.LlamaDecoderLayer", LAYERS),
        ("class:LlamaRMSNorm", NORMS),
        (["class:LlamaRMSNorm", "lm_head"], [*NORMS, "lm_head"]),
        ("class:Embedding", ["model.embed_tokens"]),
    ],
)
def test_llama_modules_by_class(selector: str | list[str], expected: list[str]) -> None:
    assert [name for name, _ in select_modules(build("llama"), selector)] == expected


def test_llama_parameters_by_class_and_name() -> None:
    got = [name for name, _ in select_parameters(build("llama"), ["class:LlamaRMSNorm", "lm_head"])]
    assert got == [f"{norm}.weight" for norm in NORMS] + ["lm_head.weight"]


def test_a_misspelled_llama_class_names_the_close_one() -> None:
    with pytest.raises(SelectorError, match=r"did you mean 'class:LlamaDecoderLayer'"):
        select_modules(build("llama"), "class:LlamaDecoderLayers")


def test_layerdrop_by_class_equals_a_hand_written_loop_bit_for_bit() -> None:
    torch.manual_seed(0)
    model = HFModule(build("llama"))
    skip = ConditionalSkip({"class:LlamaDecoderLayer": {"probability": 0.5, "seed": 3}})
    quiet_trainer(max_steps=STEPS, callbacks=[skip]).fit(model, loader("llama", n=4 * STEPS))
    ref, pattern = hand_written("llama", [0.5, 0.5], seed=3)
    assert 0 < sum(map(len, pattern)) < 2 * STEPS
    assert_states_bitwise_equal(model.model.state_dict(), ref.state_dict())
