"""The LM job's model (``ByteLM``, a tiny Hugging Face Llama): a cut holds what a ``.detach()`` by hand holds (#24).

``lm/detach_bottom`` once reported as many saved bytes as full fine-tuning: ``CostMonitor``'s FLOP counter kept the
layers below the cut alive. Every way of cutting after ``layers.1`` must now hold exactly the bytes of a
hand-written detach there, which are the bytes of freezing the embedding and layers 0-1, on measured and unmeasured
steps alike, with the same backward FLOPs.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lit_partial import ActivationDetach, ActivationMemoryMonitor, ConditionalDetach, CostMonitor
from lit_partial.demos.lm import ByteLM
from lit_partial.functional import detach_outputs
from tests.helpers import quiet_trainer

pytestmark = pytest.mark.filterwarnings("ignore:.*validation_step.*", "ignore:.*does not have many workers.*")

CUT = "model.model.layers.1"


def _model(how: str) -> tuple[ByteLM, list[Callback]]:
    torch.manual_seed(0)
    model = ByteLM(layers=4, width=16, heads=2, kv_heads=2, intermediate=32, seq_len=8)
    layer = model.model.model.layers[1]
    if how == "hand":
        forward = layer.forward
        layer.forward = lambda *a, **k: forward(*a, **k).detach()  # what a user writes without lit_partial
    elif how == "frozen":
        for name, p in model.named_parameters():
            if "embed_tokens" in name or ".layers.0." in name or ".layers.1." in name:
                p.requires_grad_(False)
    elif how == "detach_outputs":
        detach_outputs(model, CUT)  # lives as long as the model
    elif how == "ActivationDetach":
        return model, [ActivationDetach(at=CUT)]
    elif how == "ConditionalDetach":
        return model, [ConditionalDetach({CUT: "always"}, log=False)]
    return model, []


def _measure(how: str) -> dict[str, Any]:
    model, callbacks = _model(how)
    cost, monitor = CostMonitor(every_n_steps=2), ActivationMemoryMonitor()
    data = DataLoader(TensorDataset(torch.randint(0, 256, (12, 9), generator=torch.Generator().manual_seed(0))), 4)
    quiet_trainer(max_steps=3, callbacks=[*callbacks, monitor, cost], limit_val_batches=0).fit(model, data)
    return {"cost": cost.saved_bytes, "monitor": list(monitor.history), "backward_flops": cost.backward_flops}


def test_every_cut_holds_the_bytes_of_a_hand_written_detach_and_of_freezing() -> None:
    hand, frozen, full = _measure("hand"), _measure("frozen"), _measure("full")
    saved = hand["monitor"][0]
    assert hand == frozen
    assert hand["cost"] == [saved] * 2 and hand["monitor"] == [saved] * 3  # steps 0 and 2 measured by CostMonitor
    assert saved < full["monitor"][0] == full["cost"][0]
    for how in ("ActivationDetach", "ConditionalDetach", "detach_outputs"):
        assert _measure(how) == hand, how
