"""The PEFT presets (``conf/partial/lora_*.yaml`` of lit_partial.app), each instantiated and fitted on a tiny Llama.

Independent of the main job's config tree: each file is loaded and instantiated on its own.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lit_partial.app.config import CONF_DIR
from tests.helpers import quiet_trainer
from tests.hf._models import VOCAB, HFModule, build, loader, lora

pytestmark = pytest.mark.hf
PRESETS = CONF_DIR / "partial"
LR = 1e-2


def preset(name: str) -> Any:
    """The callback a preset file describes (its single entry), instantiated."""
    entries = OmegaConf.load(PRESETS / f"{name}.yaml")
    assert list(entries) == [name]
    return instantiate(entries[name])


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_lora_fa_trains_b_only() -> None:
    torch.manual_seed(0)
    model = HFModule(lora(build("llama")), lr=LR)
    before = snapshot(model)
    quiet_trainer(max_steps=2, callbacks=[preset("lora_fa")]).fit(model, loader("llama"))
    assert changed(model, before) == {n for n in before if "lora_B" in n}


def test_lora_progressive_trains_the_upper_adapters_first_then_the_lower_at_half_the_rate() -> None:
    torch.manual_seed(0)
    model = HFModule(lora(build("llama")), lr=LR)
    before = snapshot(model)
    trainer = quiet_trainer(max_epochs=2, limit_train_batches=2, callbacks=[preset("lora_progressive")])
    trainer.fit(model, loader("llama"))
    lower = {n for n in before if ".layers.0." in n and "lora_" in n}
    upper = {n for n in before if ".layers.1." in n and "lora_" in n}
    assert changed(model, before) == lower | upper  # by the end every adapter learned, and nothing else
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert groups["unfreeze@epoch1"]["lr"] == LR * 0.5 and groups["trainable"]["lr"] == LR
    assert {id(p) for p in groups["unfreeze@epoch1"]["params"]} == {id(model.get_parameter(n)) for n in lower}


def test_lora_progressive_keeps_the_lower_adapters_fixed_in_epoch_0() -> None:
    torch.manual_seed(0)
    model = HFModule(lora(build("llama")), lr=LR)
    before = snapshot(model)
    quiet_trainer(max_epochs=1, limit_train_batches=2, callbacks=[preset("lora_progressive")]).fit(
        model, loader("llama")
    )
    assert changed(model, before) == {n for n in before if ".layers.1." in n and "lora_" in n}


def test_lora_new_tokens_trains_only_the_added_rows_under_adamw() -> None:
    torch.manual_seed(0)
    base = build("llama")
    base.resize_token_embeddings(VOCAB + 2)  # two new tokens: ids 64 and 65
    model = HFModule(lora(base, modules_to_save=["embed_tokens"]), lr=LR)
    embedding = model.get_parameter("model.base_model.model.model.embed_tokens.modules_to_save.default.weight")
    before, params = embedding.detach().clone(), snapshot(model)
    quiet_trainer(max_steps=3, callbacks=[preset("lora_new_tokens")]).fit(model, loader("llama", vocab=VOCAB + 2))
    assert torch.equal(embedding[:VOCAB], before[:VOCAB])  # every pretrained row: bit-identical (AdamW decays)
    assert not torch.equal(embedding[VOCAB], before[VOCAB]) and not torch.equal(embedding[-1], before[-1])
    assert {n for n in changed(model, params) if "embed" not in n} == {n for n in params if "lora_" in n}
