"""ByteLM: Hugging Face names and parameter counts by hand, its loss against the model's own, LoRA transfer."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from lit_partial.app.pretrain import load_pretrained
from lit_partial.demos.lm import VOCAB, ByteLM, bits_per_byte
from lit_partial.errors import ConfigurationError

TINY = {"layers": 2, "width": 16, "heads": 2, "kv_heads": 1, "intermediate": 24, "seq_len": 8}


def llama_params(layers: int, width: int, heads: int, kv_heads: int, intermediate: int, **_: object) -> int:
    """Parameter count of an untied LlamaForCausalLM, by hand."""
    kv = kv_heads * (width // heads)
    attention = 2 * width * width + 2 * width * kv  # q, o; k, v (no biases)
    mlp = 3 * width * intermediate
    return 2 * VOCAB * width + layers * (attention + mlp + 2 * width) + width


def test_parameter_count_and_names_match_the_hand_count() -> None:
    assert llama_params(8, 128, 4, 4, 256) == 1_378_432  # the job's model (conf/model/lm.yaml)
    model = ByteLM(**TINY)
    assert sum(p.numel() for p in model.parameters()) == llama_params(**TINY)
    names = dict(model.named_parameters())
    assert names["model.model.layers.1.self_attn.k_proj.weight"].shape == (8, 16)
    assert {"model.model.embed_tokens.weight", "model.model.norm.weight", "model.lm_head.weight"} <= set(names)


def test_loss_is_the_hugging_face_causal_lm_loss_and_bpb_is_it_over_ln2() -> None:
    torch.manual_seed(0)
    model = ByteLM(**TINY)
    blocks = torch.randint(0, VOCAB, (3, 9))
    ours = model.per_sample_loss((blocks,)).mean()
    reference = model.model(input_ids=blocks[:, :-1], labels=blocks[:, :-1]).loss  # HF shifts the labels itself
    logits = model(blocks[:, :-1])
    by_hand = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten())
    assert torch.allclose(ours, by_hand)
    short = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), blocks[:, 1:-1].flatten())
    assert torch.allclose(reference, short)
    assert float(bits_per_byte(torch.tensor(math.log(VOCAB)))) == pytest.approx(8.0)


def test_lora_model_gets_the_plain_pretrained_weights_under_peft_names(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    torch.manual_seed(0)
    plain = ByteLM(**TINY)
    path = tmp_path / "pretrained.pt"
    torch.save({"state_dict": {k: v for k, v in plain.state_dict().items() if k.startswith("model.")}}, path)
    torch.manual_seed(1)
    lora = ByteLM(**TINY, lora_rank=4, lora_targets=["q_proj", "down_proj"])
    assert load_pretrained(lora, path, "model") == len(plain.state_dict())
    ids = torch.randint(0, VOCAB, (2, 8))
    assert torch.equal(lora(ids), plain(ids))  # LoRA's B starts at zero: the wrapped model is the pretrained one
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable == 2 * 4 * ((16 + 16) + (24 + 16))  # r * (in + out) per adapted Linear, 2 layers


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layers": 0}, r"`layers` must be an integer >= 1, got 0"),
        ({"intermediate": 1.5}, r"`intermediate` must be an integer >= 1, got 1.5"),
        ({"seq_len": -1}, r"`seq_len` must be an integer >= 1"),
        ({"lora_rank": -1}, r"`lora_rank` must be an integer >= 0, got -1"),
        ({"width": 30, "heads": 4}, r"`width` 30 must be a multiple of `heads` 4"),
        ({"heads": 4, "kv_heads": 3}, r"`heads` 4 must be a multiple of `kv_heads` 3"),
        ({"lr": float("nan")}, r"`lr` must be a finite number > 0, got nan"),
        ({"weight_decay": -1.0}, r"`weight_decay` must be a finite number >= 0, got -1.0"),
        ({"lora_rank": 2, "lora_targets": []}, r"`lora_targets` is empty while `lora_rank` > 0"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        ByteLM(**kwargs)  # type: ignore[arg-type]
