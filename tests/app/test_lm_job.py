"""The LLM job (experiment=lm): every LLM preset composes and selects what it says; a reduced multirun end to end.

The end-to-end test runs ``lit-partial-train -m experiment=lm partial=...`` on a tiny 8-layer model (width 16,
sequences of 16 bytes, 8 fine-tuning steps) and checks the report's numbers against references: trainable
parameters and optimizer-state bytes counted by hand, backward FLOPs of a plain PyTorch step under
``torch.utils.flop_counter`` with the same parameters frozen.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

import lit_partial
from lit_partial.app.compare import load_runs
from lit_partial.app.config import CONF_DIR
from lit_partial.selection import select_parameters
from tests.helpers.cli import ROOT, TRAIN, compose_train, job_env

pytest.importorskip("transformers")

LM_PRESETS = sorted(p.stem for p in (CONF_DIR / "partial" / "lm").glob("*.yaml"))
#: The tiny model and data of the reduced run (8 layers, so the presets' layer selectors mean what they say).
TINY = {"layers": 8, "width": 16, "heads": 2, "kv_heads": 2, "intermediate": 32, "seq_len": 16}
BATCH = 4
PER_LAYER = 4 * 16 * 16 + 3 * 16 * 32 + 2 * 16  # q, k, v, o + gate, up, down + two norms
EMBED = 256 * 16


def _targets_exist(node: Any) -> bool:
    """Every ``lit_partial.X`` target of ``node`` exists (presets of techniques still being written are skipped)."""
    return all(
        hasattr(lit_partial, conf["_target_"].rpartition(".")[2])
        for conf in (node or {}).values()
        if conf is not None and str(conf.get("_target_", "")).startswith("lit_partial.")
    )


@pytest.mark.parametrize("preset", LM_PRESETS)
def test_every_lm_preset_composes_with_the_experiment_and_instantiates(preset: str, tmp_path: Path) -> None:
    cfg = compose_train("experiment=lm", f"partial=lm/{preset}", output_dir=str(tmp_path))
    if not _targets_exist(cfg.partial):
        pytest.skip(f"partial/lm/{preset}.yaml names a technique lit_partial does not have yet")
    assert cfg.model._target_ == "lit_partial.demos.ByteLM" and cfg.data._target_ == "lit_partial.demos.TextDataModule"
    for conf in cfg.partial.values():
        assert type(instantiate(conf, _convert_="all")).__name__ == conf._target_.rpartition(".")[2]
    assert cfg.pretrain.model.lora_rank == 0 and cfg.pretrain.data.domain == "code" != cfg.data.domain


def test_the_freezing_presets_freeze_the_layers_they_name() -> None:
    model = instantiate(compose_train("experiment=lm").model, _convert_="all")
    total = sum(p.numel() for p in model.parameters())

    def trainable_without(preset: str) -> int:
        frozen = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "partial" / "lm" / f"{preset}.yaml"))
        (entry,) = frozen.values()  # type: ignore[union-attr]
        return total - sum(p.numel() for _, p in select_parameters(model, entry["frozen"]))  # type: ignore[index]

    per_layer = 4 * 128 * 128 + 3 * 128 * 256 + 2 * 128
    assert trainable_without("freeze_bottom") == 4 * per_layer + 128 + 256 * 128  # layers 4-7, norm, lm_head
    assert trainable_without("freeze_tuning") == 2 * per_layer  # layers 6 and 7


def test_the_experiment_keeps_the_pretraining_cache_key_apart_from_the_fine_tuning_settings() -> None:
    from lit_partial.app.pretrain import cache_path

    base = cache_path(compose_train("experiment=lm"))
    assert base.name.startswith("bytelm-code-")
    for overrides in (["partial=lm/lora"], ["model.lr=1e-2"], ["data.domain=prose", "data.batch_size=8"]):
        assert cache_path(compose_train("experiment=lm", *overrides)) == base, overrides
    assert cache_path(compose_train("experiment=lm", "model.width=64")) != base


def _backward_flops(frozen: list[str]) -> int:
    """Backward FLOPs of one plain PyTorch step of the tiny model with ``frozen`` parameters frozen."""
    from lit_partial.demos import ByteLM

    model = ByteLM(**TINY)
    for _, p in select_parameters(model, frozen) if frozen else []:
        p.requires_grad_(False)
    batch = torch.randint(0, 256, (BATCH, TINY["seq_len"] + 1))
    with FlopCounterMode(display=False) as counter:
        loss = model.per_sample_loss((batch,)).mean()
        before = counter.get_total_flops()
        loss.backward()
    return int(counter.get_total_flops() - before)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reduced_lm_comparison_reports_the_counted_costs(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    model = [f"model.{k}={v}" for k, v in TINY.items()]
    proc = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "-m",
            "experiment=lm",
            "partial=none,lm/freeze_bottom,lm/lora,lm/checkpoint",
            *model,
            "data.seq_len=16",
            f"data.batch_size={BATCH}",
            f"pretrain.cache_dir={tmp_path / 'cache'}",
            "pretrain.max_epochs=1",
            "pretrain.batch_size=1024",
            "trainer.limit_train_batches=8",
            "trainer.limit_val_batches=2",
            "costs.every_n_steps=4",
            "logger=none",
            "callbacks=none",
            "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=580,
        cwd=ROOT,
        env=job_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    runs = {r["name"]: r for r in load_runs(sweep)}
    assert list(runs) == ["none", "lm/freeze_bottom", "lm/lora", "lm/checkpoint"]
    total = 2 * EMBED + 8 * PER_LAYER + 16
    top = 4 * PER_LAYER + 16 + EMBED
    lora = 8 * 8 * (4 * (16 + 16) + 2 * (16 + 32) + (32 + 16))  # rank 8 on q, k, v, o, gate, up, down; 8 layers
    expected = {"none": total, "lm/freeze_bottom": top, "lm/lora": lora, "lm/checkpoint": total}
    assert {n: r["trainable_params"] for n, r in runs.items()} == expected
    # AdamW: exp_avg and exp_avg_sq (4 bytes an element) and a 4-byte step per parameter tensor that got gradients.
    tensors = {"none": 75, "lm/freeze_bottom": 4 * 9 + 2, "lm/lora": 8 * 7 * 2, "lm/checkpoint": 75}
    assert {n: r["optimizer_state_bytes"] for n, r in runs.items()} == {
        n: 8 * expected[n] + 4 * tensors[n] for n in runs
    }
    frozen = ["model.model.embed_tokens", "model.model.layers.[0-3]"]
    assert runs["none"]["backward_flops"] == _backward_flops([])
    assert runs["lm/freeze_bottom"]["backward_flops"] == _backward_flops(frozen)
    assert runs["lm/checkpoint"]["backward_flops"] > runs["none"]["backward_flops"]  # the recomputed forward
    assert runs["lm/checkpoint"]["saved_activation_bytes"] < 0.5 * runs["none"]["saved_activation_bytes"]
    for r in runs.values():
        assert r["val_bpb"] == pytest.approx(r["val_loss"] / torch.log(torch.tensor(2.0)).item(), rel=1e-5)
        assert 0 < r["forget_bpb"] < 8.5
    table = (sweep / "comparison.md").read_text()
    assert "| val loss | val bpb | forget bpb |" in table and f"| {top:,} |" in table
    assert (sweep / "comparison.png").stat().st_size > 10_000
    assert "corpus: prose sha256 6843353a233d470e, code sha256 1018afb731f8fa80" in proc.stdout + proc.stderr
    assert json.loads((sweep / "0" / "costs.json").read_text())["world_size"] == 1
