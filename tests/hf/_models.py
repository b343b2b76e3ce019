"""Tiny Hugging Face models from configs (2 layers, width 32, random weights) as Lightning modules, and their data.

``family`` is ``"bert"`` (``BertForSequenceClassification``: layers ``model.bert.encoder.layer.*``), ``"gpt2"``
(``GPT2LMHeadModel``, tied ``lm_head.weight``: layers ``model.transformer.h.*``) or ``"llama"``
(``LlamaForCausalLM``: layers ``model.model.layers.*``). The Lightning module holds the Hugging Face model as
``self.model`` and trains it with AdamW over ``partial_param_groups``; batches are dicts of tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("transformers")  # also when collected for doctests without the extras

import lightning as L
import torch
import transformers
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lit_partial import PartialBackpropMixin

transformers.logging.set_verbosity_error()

VOCAB, SEQ, WIDTH = 64, 8, 32
FAMILIES = ("bert", "gpt2", "llama")
#: Where each family keeps its layers (an nn.ModuleList), relative to the Hugging Face model.
LAYERS = {"bert": "bert.encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}


def build(family: str, *, vocab: int = VOCAB, dropout: float = 0.1) -> nn.Module:
    """A tiny Hugging Face model of ``family`` with random weights (seed the global RNG first)."""
    if family == "bert":
        cfg = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=2,
            vocab_size=vocab, max_position_embeddings=4 * SEQ, num_labels=3,
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        )  # fmt: skip
        return transformers.BertForSequenceClassification(cfg)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=vocab, n_positions=4 * SEQ, bos_token_id=0, eos_token_id=0,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=vocab, max_position_embeddings=4 * SEQ, attention_dropout=dropout,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(cfg)
    raise ValueError(family)


class TokenData(Dataset[dict[str, Tensor]]):
    """Fixed random token sequences; ``labels`` are a class (bert) or the sequence itself (causal LMs)."""

    def __init__(self, family: str, n: int = 16, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, seq), generator=gen)
        self.labels = torch.randint(0, 3, (n,), generator=gen) if family == "bert" else self.ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def loader(family: str, n: int = 16, batch_size: int = 4, **kw: Any) -> DataLoader[dict[str, Tensor]]:
    """Batches of :class:`TokenData` in a fixed order."""
    return DataLoader(TokenData(family, n, **kw), batch_size=batch_size, shuffle=False)


class HFModule(PartialBackpropMixin, L.LightningModule):
    """A Hugging Face model (``self.model``) trained on its own loss; AdamW over ``partial_param_groups``."""

    def __init__(self, model: nn.Module, lr: float = 1e-2) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    @override
    def forward(self, batch: dict[str, Tensor]) -> Any:
        return self.model(**batch)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch).loss  # type: ignore[no-any-return]

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self(batch).loss)

    def per_sample_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean token (or sequence) loss per sample, shape ``(B,)``."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if logits.dim() == 2:
            return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        shifted = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none"
        )
        return shifted.view(logits.shape[0], -1).mean(1)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.partial_param_groups(lr=self.lr))


@contextlib.contextmanager
def without_layers(model: nn.Module, family: str, skipped: set[int]) -> Iterator[None]:
    """Hand-written LayerDrop: the model's layer list without the ``skipped`` indices, while inside the block."""
    owner_name, _, attr = LAYERS[family].rpartition(".")
    owner = model.get_submodule(owner_name)
    layers = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList(layer for i, layer in enumerate(layers) if i not in skipped))
    try:
        yield
    finally:
        setattr(owner, attr, layers)


def lora(model: nn.Module, targets: tuple[str, ...] = ("q_proj", "v_proj"), **config: Any) -> nn.Module:
    """``model`` wrapped by PEFT with LoRA (r=4) on ``targets``; PEFT freezes everything else."""
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **config))
