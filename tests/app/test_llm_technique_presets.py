"""The presets of #23 (token_selection, drop_backward, selective_checkpointing) compose with experiment=lm, build the
callbacks the Python API builds, and do on the LLM job's ByteLM what they say."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("transformers")

import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from lit_partial import ActivationDetach, DropBackward, TokenSelection
from lit_partial.callbacks.base import Technique
from lit_partial.demos import ByteLM
from tests.helpers.cli import compose_train
from tests.helpers.trainers import RecordGrads, quiet_trainer

EXPECTED = {
    "token_selection": lambda: TokenSelection(keep=0.6, score="loss", scope="rank"),
    "drop_backward": lambda: DropBackward("model.model.layers.*.self_attn,model.model.layers.*.mlp", rate=0.5),
    "selective_checkpointing": lambda: ActivationDetach(checkpoint="model.model.layers.*", policy="matmul"),
}
TINY = {"layers": 8, "width": 16, "heads": 2, "kv_heads": 2, "intermediate": 32, "seq_len": 16}


def preset(name: str, tmp_path: Any) -> Technique:
    cfg = compose_train("experiment=lm", f"partial={name}", output_dir=str(tmp_path))
    assert list(cfg.partial) == [name]
    built: Technique = instantiate(cfg.partial[name], _convert_="all")
    return built


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_builds_what_python_builds(name: str, tmp_path: Any) -> None:
    built, expected = preset(name, tmp_path), EXPECTED[name]()
    assert type(built) is type(expected) and built.config() == expected.config()


def fit(callbacks: list[Any], steps: int = 2) -> tuple[ByteLM, RecordGrads]:
    torch.manual_seed(0)
    model, record = ByteLM(**TINY), RecordGrads()
    blocks = torch.randint(0, 256, (8, TINY["seq_len"] + 1), generator=torch.Generator().manual_seed(0))
    quiet_trainer(max_steps=steps, callbacks=[record, *callbacks]).fit(model, DataLoader(blocks, batch_size=4))
    return model, record


def test_token_selection_keeps_the_top_tokens_of_byte_lm(tmp_path: Any) -> None:
    cb = preset("token_selection", tmp_path)
    fit([cb])
    per_step = 4 * TINY["seq_len"]
    assert int(cb.tokens_valid) == 2 * per_step and int(cb.tokens_kept) == 2 * round(0.6 * per_step)


def test_drop_backward_drops_branches_of_byte_lm(tmp_path: Any) -> None:
    cb = preset("drop_backward", tmp_path)
    _, record = fit([cb], steps=1)
    assert len(cb.dropped) >= 8  # half of the 16 branches, topped up
    for branch in cb.dropped:
        assert not any(name.startswith(branch + ".") for name in record.grads[0])


def test_selective_checkpointing_gives_the_gradients_of_no_checkpointing(tmp_path: Any) -> None:
    _, plain = fit([], steps=1)
    _, sac = fit([preset("selective_checkpointing", tmp_path)], steps=1)
    assert plain.grads[0].keys() == sac.grads[0].keys()
    assert all(torch.equal(plain.grads[0][n], g) for n, g in sac.grads[0].items())
