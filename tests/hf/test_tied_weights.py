"""Tied weights (GPT-2: ``lm_head.weight`` is ``transformer.wte.weight``): every name selects the one tensor,
and the messages and the summary say that it is tied."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("transformers")

import torch

from lit_partial import GradientMasking, LayerFreezing, select_parameters
from lit_partial.errors import MaskError
from tests.helpers import quiet_trainer
from tests.hf._models import HFModule, build, loader

pytestmark = pytest.mark.hf
WTE, HEAD = "model.transformer.wte.weight", "model.lm_head.weight"
TIE_NOTE = f"'{WTE}' is tied to '{HEAD}'"


def test_every_alias_selects_the_one_tensor() -> None:
    model = HFModule(build("gpt2"))
    assert model.get_parameter(HEAD) is model.get_parameter(WTE)
    for selector in (HEAD, WTE, "model.lm_head", "re:.*lm_head.*"):
        assert [(n, p) for n, p in select_parameters(model, selector)] == [(WTE, model.get_parameter(WTE))]


def test_masking_by_the_alias_name_freezes_the_shared_rows_and_says_it_is_tied(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = HFModule(build("gpt2"))
    before = model.get_parameter(WTE).detach().clone()
    masking = GradientMasking({HEAD: {"kind": "rows", "index": [1, 2, 3]}})  # AdamW: weight decay 0.01 too
    with caplog.at_level(logging.INFO):
        quiet_trainer(max_steps=3, callbacks=[masking]).fit(model, loader("gpt2"))
    after = model.get_parameter(HEAD)
    assert torch.equal(after[4:], before[4:]) and torch.equal(after[0], before[0])  # masked rows: bit-identical
    assert not torch.equal(after[1:4], before[1:4])
    assert list(masking.masks) == [WTE]  # kept under the first name
    assert TIE_NOTE in caplog.text
    notes = [line for line in model.partial_summary(depth=2).splitlines() if line.startswith("tied:")]
    assert notes == [
        f"tied: {WTE} = {HEAD} (one tensor of {before.numel():,} elements, counted once, in row model.transformer.wte)"
    ]
    masked = (before.shape[0] - 3) * before.shape[1]
    row = next(r for r in model.partial_summary(depth=2).splitlines() if r.startswith("model.transformer.wte "))
    assert row.split()[3] == f"{masked:,}"


def test_freezing_the_alias_freezes_the_embedding_and_says_it_is_tied(caplog: pytest.LogCaptureFixture) -> None:
    model = HFModule(build("gpt2"))
    with caplog.at_level(logging.INFO):
        quiet_trainer(max_steps=1, callbacks=[LayerFreezing(frozen="model.lm_head")]).fit(model, loader("gpt2"))
    assert not model.get_parameter(WTE).requires_grad
    assert TIE_NOTE in caplog.text


def test_masks_on_both_names_of_one_tensor_are_refused_naming_the_tie() -> None:
    masking = GradientMasking({HEAD: {"kind": "rows", "index": [1]}, WTE: {"kind": "rows", "index": [2]}})
    match = rf"'{WTE}' \(one tensor tied under the names .*{HEAD}.*\) is selected by masks '{HEAD}' and '{WTE}'"
    with pytest.raises(MaskError, match=match):
        quiet_trainer(max_steps=1, callbacks=[masking]).fit(HFModule(build("gpt2")), loader("gpt2"))
