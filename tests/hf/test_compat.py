"""Compatibility: the techniques on tiny BERT, GPT-2 and Llama from configs, each against a hand-written loop.

Freezing the embeddings, checkpointing every layer, detaching a layer's output and selective backprop over dict
(and ``BatchEncoding``) batches: bit for bit equal to plain PyTorch doing the same thing by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
import transformers
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_partial import ActivationDetach, ActivationMemoryMonitor, ConditionalDetach, LayerFreezing, SelectiveBackprop
from lit_partial.functional import SavedTensorTracker
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.helpers.acted import RecomputeRecorder, below, modules_called
from tests.hf._models import FAMILIES, LAYERS, HFModule, build, loader

pytestmark = pytest.mark.hf
STEPS = 3
EMBEDDINGS = {"bert": "bert.embeddings", "gpt2": "transformer.wpe", "llama": "model.embed_tokens"}


def fit(family: str, callbacks: list[Callback], module: type[HFModule] = HFModule) -> HFModule:
    torch.manual_seed(0)
    model = module(build(family))
    quiet_trainer(max_steps=STEPS, callbacks=callbacks).fit(model, loader(family))
    return model


def hand_written(
    family: str,
    prepare: Callable[[nn.Module], Any] = lambda m: None,
    measured: list[tuple[set[str], int]] | None = None,
) -> nn.Module:
    """Plain PyTorch AdamW on the same data; ``prepare`` changes the model by hand first.

    ``measured`` receives, per step, the modules the forward called and the bytes its graph keeps for backward.
    """
    torch.manual_seed(0)
    ref = build(family).train()
    prepare(ref)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for batch in list(loader(family))[:STEPS]:
        with modules_called(ref) as called, SavedTensorTracker(exclude=[ref]) as tracker:
            loss = ref(**batch).loss
        if measured is not None:
            measured.append((called, tracker.live_bytes()))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_embeddings_equal_requires_grad_false(family: str) -> None:
    model = fit(family, [LayerFreezing(frozen=f"model.{EMBEDDINGS[family]}")])
    ref = hand_written(family, lambda m: m.get_submodule(EMBEDDINGS[family]).requires_grad_(False))
    assert_states_bitwise_equal(model.model.state_dict(), ref.state_dict())


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpointing_every_layer_changes_no_bit(family: str) -> None:
    recomputed, monitor, plain = RecomputeRecorder(), ActivationMemoryMonitor(), list[tuple[set[str], int]]()
    checkpointing = ActivationDetach(checkpoint=f"model.{LAYERS[family]}.*")  # dropout 0.1: RNG replayed
    model = fit(family, [checkpointing, recomputed, monitor])
    assert_states_bitwise_equal(model.model.state_dict(), hand_written(family, measured=plain).state_dict())
    # it acted: each backward ran again what the plain forward ran inside the layers, and less was kept
    layers = [f"{LAYERS[family]}.{i}" for i in range(2)]
    expected = [{f"model.{n}" for n in below(called, layers)} for called, _ in plain]
    assert expected[0] and recomputed.per_backward == expected
    assert all(ours < hand for ours, (_, hand) in zip(monitor.history, plain, strict=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_detaching_the_first_layer_equals_detach_written_by_hand(family: str) -> None:
    model = fit(family, [ConditionalDetach({f"model.{LAYERS[family]}.0": "always"})])

    def detach_first_layer(m: nn.Module) -> None:
        m.get_submodule(f"{LAYERS[family]}.0").register_forward_hook(lambda mod, args, out: out.detach())

    assert_states_bitwise_equal(model.model.state_dict(), hand_written(family, detach_first_layer).state_dict())


class EncodingBatches(HFModule):
    """Receives ``transformers.BatchEncoding`` batches (what tokenizers return), not plain dicts."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return transformers.BatchEncoding(dict(batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_selective_backprop_on_dict_and_batch_encoding_batches(family: str) -> None:
    for module in (HFModule, EncodingBatches):
        model = fit(family, [SelectiveBackprop(keep=0.5, method="topk")], module)
        torch.manual_seed(0)
        ref = HFModule(build(family)).train()
        opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        for batch in list(loader(family))[:STEPS]:
            ref.eval()
            with torch.no_grad():
                losses = ref.per_sample_loss(batch)
            ref.train()
            rows = torch.topk(losses, 2).indices.sort().values
            ref({k: v[rows] for k, v in batch.items()}).loss.backward()
            opt.step()
            opt.zero_grad()
        assert_states_bitwise_equal(model.state_dict(), ref.state_dict())
