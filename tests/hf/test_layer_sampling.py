"""The LISA / BAdam / AdaptiveFreezing presets (``conf/partial/``) on a tiny Llama: Hugging Face names resolve and
exactly the layers the schedule names train."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lit_partial.app.config import CONF_DIR
from lit_partial.functional.layer_sampling import active_block, sample_layers
from tests.helpers import quiet_trainer
from tests.hf._models import HFModule, build, loader

pytestmark = pytest.mark.hf


def preset(name: str, **overrides: Any) -> Any:
    entries = OmegaConf.load(CONF_DIR / "partial" / f"{name}.yaml")
    return instantiate(entries[name], **overrides)


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def llama() -> tuple[HFModule, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = HFModule(build("llama", dropout=0.0))
    return model, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_lisa_preset_trains_the_drawn_layer_and_everything_outside_the_stack() -> None:
    model, before = llama()
    cb = preset("lisa", n_active=1, interval_steps=2)
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, loader("llama"))
    (drawn,) = sample_layers(2, 1, 0, 0)
    assert cb.unit_names == ["model.model.layers.0", "model.model.layers.1"]
    layers = {n for n in before if ".layers." in n}
    assert changed(model, before) == (set(before) - layers) | {n for n in layers if f".layers.{drawn}." in n}


def test_badam_preset_with_frozen_embeddings_and_head_trains_only_its_block() -> None:
    model, before = llama()
    callbacks = [preset("freeze_embeddings_head"), preset("badam", switch_every=2)]
    quiet_trainer(max_steps=2, callbacks=callbacks).fit(model, loader("llama"))
    block = active_block(0, 2, 2, "descending")
    assert block == 1
    assert changed(model, before) == {n for n in before if ".layers.1." in n}


def test_adaptive_freezing_preset_resolves_the_decoder_layers() -> None:
    model, _ = llama()
    cb = preset("adaptive_freezing", every_n_steps=1)
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(model, loader("llama"))
    assert cb.unit_names == ["model.model.layers.0", "model.model.layers.1"]
    assert cb.previous is not None and len(cb.previous) == 2 and all(v > 0 for v in cb.previous[cb.start :])
