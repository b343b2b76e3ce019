"""The LLM job's data: real text that is the same on every machine, as byte tokens, in two domains.

The corpus (``data/stdlib_text.json.gz``, vendored, PSF License 2.0, see ``data/README.md``) was cut from the
standard library of CPython 3.11.7 by :func:`build_corpus`:

* ``code``: the source of pure-Python standard-library modules (:data:`CODE_MODULES`, in that order), the
  pretraining domain;
* ``prose``: the English help texts of ``pydoc_data.topics`` (what ``help("if")`` prints, sorted by topic), the
  shifted fine-tuning domain.

Each domain is UTF-8 bytes (token = byte, vocabulary 256: no tokenizer to download), cut into blocks of
``seq_len + 1`` bytes; a seeded permutation of the blocks puts ``val_fraction`` of them in validation. The
fine-tuning run also validates on the other domain's validation blocks (``forget_*`` metrics: what the
fine-tuning made the model forget). :func:`corpus_sha256` is the checksum of the text every run logs.

Example:
    >>> dm = TextDataModule(domain="prose", seq_len=64, batch_size=8)
    >>> dm.setup("fit")
    >>> len(dm.train_set), len(dm.val_set), len(dm.forget_set)
    (1814, 202, 252)
    >>> dm.train_set[0][0].shape, dm.train_set[0][0].dtype
    (torch.Size([65]), torch.int64)
    >>> corpus_sha256("prose")[:12], corpus_sha256("code")[:12]
    ('6843353a233d', '1018afb731f8')
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from functools import cache
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lit_partial.demos.digits import EpochSampler, ResumableDataLoader, trainer_batches_done
from lit_partial.errors import ConfigurationError

__all__ = ["CODE_MODULES", "CORPUS_PATH", "DOMAINS", "TextDataModule", "build_corpus", "corpus_sha256", "load_corpus"]

log = logging.getLogger(__name__)

#: The vendored corpus: ``{"python": version, "code": text, "prose": text, "sources": {...}}``, gzip (mtime 0).
CORPUS_PATH = Path(__file__).resolve().parent / "data" / "stdlib_text.json.gz"
DOMAINS = ("code", "prose")
#: Pure-Python standard-library modules whose source makes the ``code`` domain, in this order.
CODE_MODULES = (
    "textwrap", "string", "bisect", "heapq", "colorsys", "fnmatch", "glob", "shlex", "difflib", "calendar",
    "statistics", "fractions", "dataclasses", "argparse", "functools", "contextlib", "enum", "pprint",
)  # fmt: skip
#: Bytes kept of each domain (whole modules / topics until the limit, the last one cut).
DOMAIN_BYTES = {"code": 160 * 1024, "prose": 128 * 1024}


def build_corpus() -> dict[str, Any]:
    """Cut the corpus from this interpreter's standard library (how ``data/stdlib_text.json.gz`` was made).

    Another Python version gives other text: the vendored file, not this function, is what the job reads.
    """
    import importlib
    import pydoc_data.topics
    import sys

    def cut(parts: list[str], limit: int) -> str:
        data = "\n\n".join(parts).encode()[:limit]
        return data.decode(errors="ignore")

    sources = [Path(importlib.import_module(name).__file__ or "").read_text() for name in CODE_MODULES]
    topics = pydoc_data.topics.topics
    prose = [topics[key] for key in sorted(topics)]
    return {
        "python": sys.version.split()[0],
        "code": cut(sources, DOMAIN_BYTES["code"]),
        "prose": cut(prose, DOMAIN_BYTES["prose"]),
        "sources": {"code": [f"Lib/{m}.py" for m in CODE_MODULES], "prose": "Lib/pydoc_data/topics.py"},
    }


def write_corpus(path: Path = CORPUS_PATH) -> None:
    """Write :func:`build_corpus` to ``path`` byte-for-byte reproducibly (sorted keys, gzip mtime 0)."""
    payload = json.dumps(build_corpus(), sort_keys=True, ensure_ascii=False).encode()
    path.write_bytes(gzip.compress(payload, compresslevel=9, mtime=0))


@cache
def load_corpus() -> dict[str, Any]:
    """The vendored corpus (read once per process)."""
    loaded: dict[str, Any] = json.loads(gzip.decompress(CORPUS_PATH.read_bytes()))
    return loaded


def corpus_sha256(domain: str) -> str:
    """SHA-256 of the UTF-8 bytes of ``domain``'s text: the same on every machine."""
    return hashlib.sha256(load_corpus()[_check_domain(domain, "domain")].encode()).hexdigest()


def _check_domain(domain: Any, name: str) -> str:
    if domain not in DOMAINS:
        raise ConfigurationError(f"`{name}` must be one of {list(DOMAINS)}, got {domain!r}; e.g. {name}=prose.")
    return str(domain)


def _blocks(domain: str, seq_len: int, val_fraction: float, split_seed: int) -> tuple[Tensor, Tensor]:
    """``domain`` as ``(N, seq_len + 1)`` int64 byte blocks, split by a seeded permutation into (train, val)."""
    data = torch.frombuffer(bytearray(load_corpus()[domain].encode()), dtype=torch.uint8).long()
    n = len(data) // (seq_len + 1)
    blocks = data[: n * (seq_len + 1)].view(n, seq_len + 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    n_val = max(1, round(val_fraction * n))
    return blocks[order[n_val:]], blocks[order[:n_val]]


class TextDataModule(L.LightningDataModule):
    """Byte-level language modelling on one domain of the vendored corpus, validated on it and on the other.

    Batches are ``(B, seq_len + 1)`` int64 tensors of bytes (inputs ``[:, :-1]``, targets ``[:, 1:]``). The
    training order is a seeded shuffle per epoch that resumes mid-epoch (the digits job's
    :class:`~lit_partial.demos.digits.EpochSampler`); validation has two loaders: the ``domain``'s held-out
    blocks (``val_*`` metrics) and, unless ``forgetting_domain`` is ``None``, those of that domain (``forget_*``).

    Args:
        domain: The training domain, ``"code"`` or ``"prose"``.
        forgetting_domain: A second validation domain (what fine-tuning may forget), or ``None``.
        seq_len: Tokens (bytes) per training sequence.
        batch_size: Sequences per batch (per process under DDP).
        val_fraction: Fraction of each domain's blocks held out, in (0, 1).
        split_seed: Seed of the block permutation; the same seed always gives the same split.
        shuffle_seed: Seed of the per-epoch training order.
        num_workers: DataLoader workers (0: the data is in memory).

    Raises:
        ConfigurationError: An unknown domain, the two domains equal, a non-positive ``seq_len`` or
            ``batch_size``, ``val_fraction`` outside (0, 1).
    """

    def __init__(
        self,
        domain: str = "prose",
        forgetting_domain: str | None = "code",
        seq_len: int = 64,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_domain(domain, "domain")
        if forgetting_domain is not None:
            _check_domain(forgetting_domain, "forgetting_domain")
        if forgetting_domain == domain:
            raise ConfigurationError(
                f"`forgetting_domain` is the training domain {domain!r}; name the other one or null."
            )
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"`{name}` must be a positive integer, got {value!r}.")
        if not (isinstance(val_fraction, int | float) and 0.0 < val_fraction < 1.0):
            raise ConfigurationError(f"`val_fraction` must be in (0, 1), got {val_fraction!r}; e.g. 0.1.")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigurationError(f"`num_workers` must be a non-negative integer, got {num_workers!r}.")
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.forget_set: TensorDataset | None = None

    @override
    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        train, val = _blocks(hp["domain"], hp["seq_len"], hp["val_fraction"], hp["split_seed"])
        self.train_set, self.val_set = TensorDataset(train), TensorDataset(val)
        sums = [f"{hp['domain']} sha256 {corpus_sha256(hp['domain'])[:16]}"]
        if hp["forgetting_domain"] is not None:
            forget = _blocks(hp["forgetting_domain"], hp["seq_len"], hp["val_fraction"], hp["split_seed"])[1]
            self.forget_set = TensorDataset(forget)
            sums.append(f"{hp['forgetting_domain']} sha256 {corpus_sha256(hp['forgetting_domain'])[:16]}")
        rank_zero_info(
            f"corpus: {', '.join(sums)} (Python {load_corpus()['python']} stdlib text); {len(train)} training and "
            f"{len(val)} validation blocks of {hp['seq_len'] + 1} bytes"
        )

    def _batches_done(self) -> tuple[int, bool]:
        return trainer_batches_done(self.trainer)

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        self.setup("fit")
        assert self.train_set is not None
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = self.hparams["shuffle_seed"]
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.hparams["batch_size"],
            sampler=EpochSampler(self.train_set, num_replicas=replicas, rank=rank, seed=seed),
            num_workers=self.hparams["num_workers"],
            generator=torch.Generator().manual_seed(seed),
            batches_done=self._batches_done,
        )

    @override
    def val_dataloader(self) -> list[DataLoader[Any]]:
        self.setup("fit")
        sets = [s for s in (self.val_set, self.forget_set) if s is not None]
        return [DataLoader(s, batch_size=64, num_workers=self.hparams["num_workers"]) for s in sets]
