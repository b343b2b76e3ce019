"""The LLM job's corpus and data module: pinned checksums, a seeded split that covers every block once, errors."""

from __future__ import annotations

import hashlib
import sys

import pytest
import torch

from lit_partial.demos.text import CORPUS_PATH, TextDataModule, build_corpus, corpus_sha256, load_corpus
from lit_partial.errors import ConfigurationError

#: SHA-256 of the UTF-8 text of each domain (lit_partial/demos/data/README.md) and of the vendored file.
TEXT_SHA256 = {
    "code": "1018afb731f8fa805a45974fcd785ad08b6011cfef8f5ba9e8bd9357bccb1fd5",
    "prose": "6843353a233d470e7861af2e103977b6154d7295f27022c8e40742470e47c750",
}
FILE_SHA256 = "e74f9187ffcce69458b4f4737dda23f941a00ac2ec6dd34caaf5a52d6bf528b5"


def test_the_corpus_is_the_pinned_text() -> None:
    assert hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest() == FILE_SHA256
    assert {d: corpus_sha256(d) for d in TEXT_SHA256} == TEXT_SHA256
    corpus = load_corpus()
    assert (len(corpus["code"].encode()), len(corpus["prose"].encode())) == (160 * 1024, 128 * 1024)
    assert "def " in corpus["code"] and 'The "if" statement' in corpus["prose"]


@pytest.mark.skipif(sys.version.split()[0] != "3.11.7", reason="the corpus was cut from CPython 3.11.7's stdlib")
def test_build_corpus_reproduces_the_vendored_text() -> None:
    built, vendored = build_corpus(), load_corpus()
    assert {k: built[k] for k in ("code", "prose")} == {k: vendored[k] for k in ("code", "prose")}


def _rows(t: torch.Tensor) -> set[bytes]:
    return {bytes(r.to(torch.uint8).tolist()) for r in t}


def test_split_covers_every_block_once_and_depends_only_on_the_seed() -> None:
    dm = TextDataModule(domain="prose", seq_len=64)
    dm.setup("fit")
    assert dm.train_set is not None and dm.val_set is not None and dm.forget_set is not None
    train, val = dm.train_set.tensors[0], dm.val_set.tensors[0]
    # Reference: the prose bytes cut by hand into consecutive 65-byte blocks.
    data = load_corpus()["prose"].encode()
    blocks = [data[i * 65 : (i + 1) * 65] for i in range(len(data) // 65)]
    assert len(train) + len(val) == len(blocks) == 2016 and len(val) == round(0.1 * 2016)
    assert _rows(train) | _rows(val) == set(blocks) and not _rows(train) & _rows(val)
    again = TextDataModule(domain="prose", seq_len=64)
    again.setup("fit")
    assert again.train_set is not None and torch.equal(again.train_set.tensors[0], train)
    other = TextDataModule(domain="prose", seq_len=64, split_seed=1)
    other.setup("fit")
    assert other.val_set is not None and _rows(other.val_set.tensors[0]) != _rows(val)
    # The forgetting split is the code domain's own validation split.
    code = TextDataModule(domain="code", forgetting_domain=None, seq_len=64)
    code.setup("fit")
    assert code.val_set is not None and torch.equal(dm.forget_set.tensors[0], code.val_set.tensors[0])
    assert code.forget_set is None and len(code.val_dataloader()) == 1 and len(dm.val_dataloader()) == 2


def test_training_batches_are_inputs_and_shifted_targets_in_a_seeded_order() -> None:
    dm = TextDataModule(seq_len=16, batch_size=4, shuffle_seed=3)
    first = next(iter(dm.train_dataloader()))[0]
    again = next(iter(TextDataModule(seq_len=16, batch_size=4, shuffle_seed=3).train_dataloader()))[0]
    assert first.shape == (4, 17) and first.dtype == torch.int64 and torch.equal(first, again)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"domain": "poetry"}, r"`domain` must be one of \['code', 'prose'\], got 'poetry'"),
        ({"forgetting_domain": "x"}, r"`forgetting_domain` must be one of"),
        ({"domain": "code", "forgetting_domain": "code"}, r"`forgetting_domain` is the training domain 'code'"),
        ({"seq_len": 0}, r"`seq_len` must be a positive integer, got 0"),
        ({"batch_size": True}, r"`batch_size` must be a positive integer, got True"),
        ({"val_fraction": 1.0}, r"`val_fraction` must be in \(0, 1\), got 1.0"),
        ({"num_workers": -1}, r"`num_workers` must be a non-negative integer, got -1"),
    ],
)
def test_bad_settings_are_refused_naming_the_value(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        TextDataModule(**kwargs)  # type: ignore[arg-type]
