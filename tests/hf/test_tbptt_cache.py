"""Truncated BPTT carrying a Hugging Face cache between chunks: Transformer-XL-style memory on a tiny GPT-2.

Each chunk of ``k`` tokens attends to the keys and values of the chunks before it (the cache, carried), while
backward stops at the chunk boundary (the cache is detached between chunks by ``lit_partial.tbptt``).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

pytest.importorskip("transformers")

import lightning as L
import torch
from torch import Tensor, nn
from typing_extensions import override

from lit_partial import PartialBackpropMixin
from lit_partial.tbptt import detach_hiddens, truncated_bptt
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.hf._models import build, loader

pytestmark = pytest.mark.hf
K, T = 4, 16


def cache_kwarg(model: nn.Module) -> str:
    """The cache argument's name: ``cache`` (transformers >= 5.x) or ``past_key_values`` (before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def run_chunk(model: nn.Module, ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
    """Causal-LM loss of one chunk given the memory of the previous ones, and the memory extended by it."""
    out = model(input_ids=ids, labels=ids, use_cache=True, **{cache_kwarg(model): cache})
    return out.loss, getattr(out, "cache", None) or out.past_key_values


class MemoryGPT2(PartialBackpropMixin, L.LightningModule):
    """Transformer-XL-style training: one optimizer step per chunk of K tokens, the cache carried, detached."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.automatic_optimization = False  # tbptt_step steps the optimizer once per chunk

    def chunk_step(self, chunk: dict[str, Tensor], cache: Any) -> tuple[Tensor, Any]:
        return run_chunk(self.model, chunk["input_ids"], cache)  # cache is None for the first chunk

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("train_loss", self.tbptt_step({"input_ids": batch["input_ids"]}, k=K, step_fn=self.chunk_step))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_gpt2_cache_tbptt_equals_a_hand_written_chunked_loop() -> None:
    torch.manual_seed(0)
    model = MemoryGPT2(build("gpt2"))
    quiet_trainer(max_epochs=1, callbacks=[]).fit(model, loader("gpt2", n=8, seq=T))

    torch.manual_seed(0)
    ref = build("gpt2").train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for batch in loader("gpt2", n=8, seq=T):
        cache = None
        for start in range(0, T, K):
            loss, cache = run_chunk(ref, batch["input_ids"][:, start : start + K], cache)
            loss.backward()
            opt.step()
            opt.zero_grad()
            for layer in cache.layers:  # by hand: cut the memory's graph, keep its values
                layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
    assert_states_bitwise_equal(model.model.state_dict(), ref.state_dict())


def test_chunks_see_the_memory_and_backward_stops_at_the_chunk_boundary() -> None:
    torch.manual_seed(0)
    model = build("gpt2", dropout=0.0).train()
    ids = next(iter(loader("gpt2", n=2, batch_size=2, seq=T)))["input_ids"]
    seen = []

    def step(ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
        seen.append(0 if cache is None else cache.get_seq_length())
        return run_chunk(model, ids, cache)

    _, cache = truncated_bptt(ids, K, step)
    assert seen == [0, 4, 8, 12] and cache.get_seq_length() == T  # each chunk attends to all tokens before it
    assert all(not layer.keys.requires_grad for layer in cache.layers)
    # The control: carrying the cache without detaching it backpropagates into the previous chunk's graph.
    loss, attached = run_chunk(model, ids[:, :K], None)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        run_chunk(model, ids[:, K : 2 * K], attached)[0].backward()
    # detach_hiddens returns a copy: the cache the model returned keeps its graph, the carried one has none.
    carried = detach_hiddens(attached)
    assert attached.layers[0].keys.requires_grad and not carried.layers[0].keys.requires_grad
    assert torch.equal(carried.layers[0].keys, attached.layers[0].keys)
