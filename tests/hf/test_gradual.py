"""A gradual-unfreezing schedule generated from a Hugging Face model's depth: Llama built from a config."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import lightning as L
import torch

from lit_partial import LayerFreezing
from lit_partial.functional.freezing import BlockStack, find_block_stack
from tests.helpers import quiet_trainer
from tests.hf._models import HFModule, build, loader

pytestmark = pytest.mark.hf


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        (
            "llama",
            BlockStack(
                "model.model.layers",
                ["model.model.layers.0", "model.model.layers.1"],
                ["model.model.embed_tokens"],
                ["model.model.norm", "model.lm_head"],
            ),
        ),
        (  # lm_head is tied to wte (named there first): it unfreezes with the embeddings
            "gpt2",
            BlockStack(
                "model.transformer.h",
                ["model.transformer.h.0", "model.transformer.h.1"],
                ["model.transformer.wte", "model.transformer.wpe"],
                ["model.transformer.ln_f"],
            ),
        ),
    ],
)
def test_the_layer_stack_of_hugging_face_models(family: str, expected: BlockStack) -> None:
    assert find_block_stack(HFModule(build(family))) == expected


class Unchanged(L.Callback):
    """At each epoch start, which of the watched modules are still as they were at fit start."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.seen: list[list[str]] = []

    def _weights(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {
            n: torch.cat([p.detach().flatten() for p in pl_module.get_submodule(n).parameters()]) for n in self.names
        }

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = self._weights(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = self._weights(pl_module)
        self.seen.append([n for n in self.names if torch.equal(now[n], self.start[n])])


def test_gradual_unfreezing_of_llama_thaws_from_the_top() -> None:
    torch.manual_seed(0)
    model = HFModule(build("llama", dropout=0.0))
    cb = LayerFreezing.gradual(model, lr_decay=2.0)
    assert (
        cb.config()
        == LayerFreezing(
            frozen=["model.model.embed_tokens", "model.model.layers.0", "model.model.layers.1"],
            schedule=[
                {"epoch": 1, "unfreeze": "model.model.layers.1", "lr_scale": 0.5},
                {"epoch": 2, "unfreeze": "model.model.layers.0", "lr_scale": 0.25},
                {"epoch": 3, "unfreeze": "model.model.embed_tokens", "lr_scale": 0.125},
            ],
        ).config()
    )
    watch = Unchanged(["model.model.embed_tokens", "model.model.layers.0", "model.model.layers.1", "model.lm_head"])
    trainer = quiet_trainer(max_epochs=4, callbacks=[cb, watch])
    trainer.fit(model, loader("llama", n=4))  # one step per epoch
    embed, layer0, layer1, _ = watch.names
    assert watch.seen == [watch.names, [embed, layer0, layer1], [embed, layer0], [embed]]
    names = [g["name"] for g in trainer.optimizers[0].param_groups]
    assert names == ["trainable", "unfreeze@epoch1", "unfreeze@epoch2", "unfreeze@epoch3"]
