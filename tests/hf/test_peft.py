"""PEFT (LoRA) models: parameter groups for what PEFT froze, LoRA-only selectors, summaries of wrapped models."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch

from lit_partial import LayerFreezing, select_parameters
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.hf._models import HFModule, build, loader, lora

pytestmark = pytest.mark.hf
LR = 1e-2


def test_schedule_unfreezing_what_peft_froze_trains_it_at_the_scaled_rate_from_step_0() -> None:
    torch.manual_seed(0)
    model = HFModule(lora(build("llama")), lr=LR)
    norms = [n for n, _ in select_parameters(model, "**norm")]
    assert norms and not any(model.get_parameter(n).requires_grad for n in norms)  # frozen by PEFT, not by us
    freezing = LayerFreezing(schedule=[{"step": 0, "unfreeze": "**norm", "lr_scale": 0.1}])
    trainer = quiet_trainer(max_steps=3, callbacks=[freezing])
    trainer.fit(model, loader("llama"))
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    assert {name: g["lr"] for name, g in groups.items()} == {"trainable": LR, "unfreeze@step0": LR * 0.1, "frozen": LR}
    assert {id(p) for p in groups["unfreeze@step0"]["params"]} == {id(model.get_parameter(n)) for n in norms}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad and n not in norms)

    torch.manual_seed(0)  # hand-written: the norms trainable from step 0 in their own AdamW group at lr / 10
    ref = lora(build("llama")).train()
    ref_norms = [p for n, p in ref.named_parameters() if n.endswith("norm.weight")]
    for p in ref_norms:
        p.requires_grad_(True)
    lora_params = [p for n, p in ref.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW([{"params": lora_params, "lr": LR}, {"params": ref_norms, "lr": LR * 0.1}])
    for batch in list(loader("llama"))[:3]:
        ref(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert_states_bitwise_equal(model.model.state_dict(), ref.state_dict())


def test_lora_selectors_name_adapters_without_the_base_layer() -> None:
    model = HFModule(lora(build("llama")))
    layer = "model.base_model.model.model.layers"
    # `**q_proj` names the LoRA-wrapped module, so it selects its frozen pretrained weight too:
    assert f"{layer}.0.self_attn.q_proj.base_layer.weight" in [n for n, _ in select_parameters(model, "**q_proj")]
    # The adapters of the modules a selector names: `<selector>.lora_*`
    assert [n for n, _ in select_parameters(model, "**q_proj.lora_*")] == [
        f"{layer}.{i}.self_attn.q_proj.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"
    ]
    # The adapters anywhere below a module (here: layer 1): `<selector>.**.lora_*`; only A: `...lora_A`
    assert [n for n, _ in select_parameters(model, "**layers.1.**.lora_A")] == [
        f"{layer}.1.self_attn.{proj}.lora_A.default.weight" for proj in ("q_proj", "v_proj")
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, _ in select_parameters(model, "**.lora_*")} == trainable


def test_unfreezing_a_peft_base_weight_warns_with_the_lora_selector() -> None:
    freezing = LayerFreezing(frozen="**lora_A", schedule=[{"step": 1, "unfreeze": "**q_proj"}])
    with pytest.warns(UserWarning, match=r"selects 2 frozen PEFT base weights .* select '\*\*q_proj.lora_\*'"):
        quiet_trainer(max_steps=1, callbacks=[freezing]).fit(HFModule(lora(build("llama"))), loader("llama"))


def test_summary_of_a_peft_model_has_a_row_per_part_at_each_depth() -> None:
    model = HFModule(lora(build("llama")))
    base = "model.base_model.model"  # HFModule.model -> PeftModel.base_model -> LoraModel.model: looked through
    rows = model.partial_summary().splitlines()
    assert [r.split()[0] for r in rows[2:]] == [f"{base}.model", f"{base}.lm_head", "total"]
    deep = {r.split()[0]: r.split() for r in model.partial_summary(depth=3).splitlines()[2:]}
    assert list(deep) == [
        f"{base}.model.embed_tokens", f"{base}.model.layers.0", f"{base}.model.layers.1", f"{base}.model.norm",
        f"{base}.lm_head", "total",
    ]  # fmt: skip
    lora_per_layer = sum(p.numel() for n, p in model.named_parameters() if "layers.0." in n and "lora_" in n)
    assert deep[f"{base}.model.layers.0"][2] == f"{lora_per_layer:,}"  # trainable: the adapters only
    assert deep[f"{base}.model.embed_tokens"][2] == "0"


def test_lora_fa_freezes_a_and_trains_b() -> None:
    torch.manual_seed(0)
    model = HFModule(lora(build("llama")))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quiet_trainer(max_steps=2, callbacks=[LayerFreezing(frozen="**lora_A")]).fit(model, loader("llama"))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if "lora_B" in n}
