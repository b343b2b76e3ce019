"""Freezing + checkpointing (transformers #21381 / #42489): gradients of no checkpointing, frozen layers not rerun."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from torch import nn

from lit_partial import ActivationDetach, LayerFreezing
from lit_partial._compat import HF_CHECKPOINT_FUNC_ATTR, hf_checkpoint_layers
from lit_partial.functional.frozen_checkpointing import frozen_aware_checkpointing
from tests.helpers.trainers import RecordGrads, quiet_trainer
from tests.hf._models import HFModule, loader

# Calls are counted with forward *pre*-hooks: torch stops a recomputation as soon as backward has what it needs, which
# is inside a layer's last module, so that module's forward hooks never fire during it.
FROZEN = ["model.model.embed_tokens", "model.model.layers.0", "model.model.layers.1"]


def llama() -> nn.Module:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


def enable_hf_checkpointing(model: nn.Module, **kwargs: Any) -> None:
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs or None)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)


def run(checkpointing: str, **kwargs: Any) -> tuple[dict[str, torch.Tensor], list[int]]:
    """One step of LayerFreezing(FROZEN); the gradients and how often each layer's MLP ran."""
    hf = llama()
    if checkpointing == "hf":
        enable_hf_checkpointing(hf, **kwargs)
    callbacks: list[Any] = [LayerFreezing(frozen=FROZEN), record := RecordGrads()]
    if checkpointing == "ours":
        callbacks.append(ActivationDetach(checkpoint="model.model.layers.*"))
    calls = [0] * 4
    for i, layer in enumerate(hf.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))  # pre: see below
    hf.train()
    quiet_trainer(max_steps=1, callbacks=callbacks).fit(HFModule(hf), loader("llama", n=4))
    return record.grads[0], calls


@pytest.mark.parametrize(("checkpointing", "kwargs"), [("hf", {}), ("hf", {"use_reentrant": True}), ("ours", {})])
def test_frozen_prefix_with_checkpointing_gives_the_gradients_of_no_checkpointing(
    checkpointing: str, kwargs: dict[str, Any]
) -> None:
    expected, plain_calls = run("none")
    grads, calls = run(checkpointing, **kwargs)
    assert plain_calls == [1, 1, 1, 1]
    assert calls == [1, 1, 2, 2]  # only the layers that train are recomputed
    assert grads.keys() == expected.keys() and not any(name.startswith(tuple(FROZEN)) for name in grads)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_without_the_shim_hugging_face_recomputes_frozen_layers_and_the_shim_unwinds() -> None:
    hf = llama()
    enable_hf_checkpointing(hf)
    for name in FROZEN:
        hf.get_submodule(name.removeprefix("model.")).requires_grad_(False)
    calls = [0] * 4
    for i, layer in enumerate(hf.model.layers):
        layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))  # pre: see below
    hf.train()
    ids = torch.randint(0, 64, (2, 8))
    hf(input_ids=ids, labels=ids).loss.backward()
    assert calls == [2, 2, 2, 2]  # enable_input_require_grads: backward runs through the frozen layers too
    originals = [layer.__dict__[HF_CHECKPOINT_FUNC_ATTR] for _, layer in hf_checkpoint_layers(hf)]
    assert len(originals) == 5  # LlamaModel carries the flag too (its function is unused in transformers 5)
    handles = frozen_aware_checkpointing(hf)
    calls[:] = [0] * 4
    hf(input_ids=ids, labels=ids).loss.backward()
    assert calls == [1, 1, 2, 2]
    handles.remove()
    assert [layer.__dict__[HF_CHECKPOINT_FUNC_ATTR] for _, layer in hf_checkpoint_layers(hf)] == originals
