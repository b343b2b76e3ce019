"""The LLM job (experiment=lm): every LLM preset composes and selects what it says; a reduced multirun end to end.

The end-to-end test runs ``lit-partial-train -m experiment=lm partial=...`` on a tiny 8-layer model (width 16,
sequences of 16 bytes, 8 fine-tuning steps) and checks the report's numbers against references: trainable
parameters and optimizer-state bytes counted by hand, backward FLOPs of a plain PyTorch step under
``torch.utils.flop_counter`` with the same parameters frozen.
"""

from __future__ import annotations

import json
import signal
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
from lit_partial.selectors import select_parameters
from tests.helpers.cli import ROOT, TRAIN, compose_train, job_env, run_job

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


def test_lm_presets_are_one_entry_named_lm_stem_in_the_partial_package() -> None:
    for preset in LM_PRESETS:
        path = CONF_DIR / "partial" / "lm" / f"{preset}.yaml"
        header = path.read_text().splitlines()[0]
        if header == "# @package _global_":  # lm/lora: model settings, PEFT does the freezing
            assert set(OmegaConf.load(path)) == {"model"}, path.name
            continue
        assert header == "# @package partial", path.name
        entries = list(OmegaConf.load(path))  # lm/badam: a LayerFreezing beside BAdam, lm_badam_frozen
        assert f"lm_{preset}" in entries and all(e.startswith(f"lm_{preset}") for e in entries), path.name


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


#: Fine-tuning steps of the job: one epoch of 1814 prose blocks in batches of 16.
JOB_STEPS = 114


def _preset(name: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "partial" / "lm" / f"{name}.yaml"))  # type: ignore[return-value]


def test_the_layer_switching_presets_select_the_decoder_stack_and_fit_the_job() -> None:
    from lit_partial.functional.layer_sampling import active_block
    from lit_partial.selectors import select_modules

    model = instantiate(compose_train("experiment=lm").model, _convert_="all")
    layers = [f"model.model.layers.{i}" for i in range(8)]
    lisa = _preset("lisa")["lm_lisa"]
    assert [n for n, _ in select_modules(model, lisa["layers"])] == layers
    assert (lisa["n_active"], lisa["reset_optimizer_state"]) == (2, True)
    assert 0.02 * JOB_STEPS <= lisa["interval_steps"] <= 0.1 * JOB_STEPS  # a few % of the steps: many draws
    badam = _preset("badam")
    assert badam["lm_badam_frozen"]["frozen"] == ["model.model.embed_tokens", "model.model.norm", "model.lm_head"]
    block = badam["lm_badam"]
    assert [n for n, _ in select_modules(model, block["blocks"])] == layers
    visited = {active_block(s, 8, block["switch_every"], block["order"]) for s in range(JOB_STEPS)}
    assert visited == set(range(8))  # every block trains in the job's one epoch
    frozen = _preset("adaptive_freezing")["lm_adaptive_freezing"]
    assert [n for n, _ in select_modules(model, frozen["layers"])] == ["model.model.embed_tokens", *layers]
    assert JOB_STEPS // frozen["every_n_steps"] >= 5  # several evaluations in the job
    drop = _preset("drop_backward")["lm_drop_backward"]
    branches = [n for n, _ in select_modules(model, drop["branches"])]
    assert len(branches) == 16 and {n.rpartition(".")[2] for n in branches} == {"self_attn", "mlp"}
    assert (drop["rate"], drop["allocation"]) == (0.5, "uniform")
    tokens = _preset("token_selection")["lm_token_selection"]
    assert (tokens["keep"], tokens["score"], tokens["scope"]) == (0.6, "loss", "rank")
    policy = instantiate(_preset("checkpoint_matmul")["lm_checkpoint_matmul"], _convert_="all")
    assert policy.config() == lit_partial.ActivationDetach(checkpoint="model.model.layers.*", policy="matmul").config()


def test_byte_lm_training_loss_goes_through_token_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    from lit_partial.demos import ByteLM

    model = ByteLM(**TINY)
    monkeypatch.setattr(model, "log", lambda *a, **k: None)  # no trainer
    batch = (torch.randint(0, 256, (BATCH, TINY["seq_len"] + 1)),)
    losses = model._token_losses(batch)
    assert torch.equal(model.training_step(batch, 0), losses.mean())  # no TokenSelection: the plain mean, bit for bit
    seen: list[tuple[torch.Tensor, torch.Tensor, Any]] = []
    monkeypatch.setattr(model, "token_loss", lambda losses, valid, batch: seen.append((losses, valid, batch)) or 0)
    model.training_step(batch, 0)
    ((got, valid, passed),) = seen  # TokenSelection's seam gets every byte's loss, all valid, and the batch
    assert torch.equal(got, losses) and bool(valid.all()) and passed is batch


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


def _reduced(cache: Path) -> list[str]:
    """The reduced job: the tiny model, 1 pretraining epoch of 9 batches, sequences of 16 bytes."""
    model = [f"model.{k}={v}" for k, v in TINY.items()]
    return [
        "experiment=lm",
        *model,
        "data.seq_len=16",
        f"data.batch_size={BATCH}",
        f"pretrain.cache_dir={cache}",
        "pretrain.max_epochs=1",
        "pretrain.batch_size=1024",
    ]


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reduced job's pretrained model, shared by the tests of this module."""
    cache = tmp_path_factory.mktemp("lm_pretrained")
    proc = run_job(
        *_reduced(cache),
        "trainer.max_steps=1",
        "trainer.limit_val_batches=0",
        "callbacks=none",
        "logger=none",
        "trainer.enable_progress_bar=false",
        run_dir=tmp_path_factory.mktemp("lm_pretrain_run"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name.startswith("bytelm-code-") for p in cache.glob("*.pt")] == [True]
    return cache


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reduced_lm_comparison_reports_the_counted_costs(tmp_path: Path, lm_cache: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(TRAIN),
            "-m",
            "partial=none,lm/freeze_bottom,lm/lora,[lm/lora,lora_fa],lm/checkpoint",
            *_reduced(lm_cache),
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
    assert list(runs) == ["none", "lm/freeze_bottom", "lm/lora", "lm/lora,lora_fa", "lm/checkpoint"]
    total = 2 * EMBED + 8 * PER_LAYER + 16
    top = 4 * PER_LAYER + 16 + EMBED
    lora = 8 * 8 * (4 * (16 + 16) + 2 * (16 + 32) + (32 + 16))  # rank 8 on q, k, v, o, gate, up, down; 8 layers
    lora_b = 8 * 8 * (5 * 16 + 2 * 32)  # LoRA-FA: only B (out x rank) learns
    expected = {
        "none": total,
        "lm/freeze_bottom": top,
        "lm/lora": lora,
        "lm/lora,lora_fa": lora_b,
        "lm/checkpoint": total,
    }
    assert {n: r["trainable_params"] for n, r in runs.items()} == expected
    # AdamW: exp_avg and exp_avg_sq (4 bytes an element) and a 4-byte step per parameter tensor that got gradients.
    tensors = {
        "none": 75,
        "lm/freeze_bottom": 4 * 9 + 2,
        "lm/lora": 8 * 7 * 2,
        "lm/lora,lora_fa": 8 * 7,
        "lm/checkpoint": 75,
    }
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


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "overrides",
    [("partial=lm/lora",), ("partial=lm/freeze_bottom", "trainer.devices=2", "trainer.strategy=ddp_spawn")],
    ids=["lora-peft", "freeze_bottom-ddp_spawn-2-processes"],
)
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, lm_cache: Path, overrides: tuple[str, ...]) -> None:
    common = (
        *_reduced(lm_cache),
        *overrides,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",  # 8 steps over two epochs
        "trainer.limit_val_batches=1",
        "callbacks.last_checkpoint.every_n_train_steps=1",
        "callbacks.learning_rate_monitor=null",
        "logger=none",
        "trainer.enable_progress_bar=false",
    )
    reference = tmp_path / "reference"
    assert (proc := run_job(*common, run_dir=reference)).returncode == 0, proc.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = run_job(
        *common,
        "+callbacks.killer={_target_:tests.helpers.cli_targets.KillAt,step:5}",
        "extra_target_roots=[tests.helpers.cli_targets]",
        run_dir=killed,
        new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    proc = run_job(*common, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}", run_dir=resumed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (reference, resumed))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert any("lora_B" in k for k in a) == ("partial=lm/lora" in overrides)


def test_the_report_of_lm_runs_has_bits_per_byte_columns() -> None:
    from lit_partial.app.compare import markdown_table

    costs = {"forward_flops": 1e6, "trainable_params": 10, "saved_activation_bytes": 2048, "step_time_ms": 2.0}
    rows = [
        {"name": "none", "val_loss": 1.5, "val_bpb": 2.164, "forget_bpb": 3.0, "backward_flops": 4e6, **costs},
        {"name": "lm/lora", "val_loss": 1.6, "val_bpb": 2.308, "forget_bpb": 2.9, "backward_flops": 1e6, **costs},
    ]
    for r in rows:
        r["optimizer_state_bytes"] = 4096
    lines = markdown_table(rows).splitlines()
    assert lines[0].startswith("| technique (`partial=`) | val loss | val bpb | forget bpb | backward MFLOPs/step |")
    assert lines[1] == "|---" * 11 + "|"
    assert lines[3] == "| lm/lora | 1.600 | 2.308 | 2.900 | 1.00 | 0.25x | 10 | 2 | 4 | 2.0 | 1.00x |"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_reduced_lisa_badam_token_selection_report_the_counted_costs(tmp_path: Path, lm_cache: Path) -> None:
    """8 steps: LISA's first two draws (interval 6), BAdam's first block (layer 7), TokenSelection keeping 60 %."""
    from lit_partial.functional.layer_sampling import sample_layers

    sweep = tmp_path / "sweep"
    proc = run_job(
        "-m",
        "partial=lm/lisa,lm/badam,lm/token_selection",
        *_reduced(lm_cache),
        "trainer.limit_train_batches=8",
        "trainer.limit_val_batches=1",
        "costs.every_n_steps=4",
        "logger=none",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={sweep}",
        run_dir=tmp_path / "unused",
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    runs = {r["name"]: r for r in load_runs(sweep)}
    assert list(runs) == ["lm/lisa", "lm/badam", "lm/token_selection"]
    # LISA: 2 of the 8 layers, and the embeddings, final norm and lm_head (outside the stack) throughout; with
    # reset_optimizer_state, AdamW holds the state of exactly these (2 x 9 + 3 tensors), also after the switch.
    lisa = 2 * PER_LAYER + 2 * EMBED + 16
    assert runs["lm/lisa"]["trainable_params"] == lisa
    assert runs["lm/lisa"]["optimizer_state_bytes"] == runs["lm/lisa"]["final_optimizer_state_bytes"]
    assert runs["lm/lisa"]["optimizer_state_bytes"] == 8 * lisa + 4 * (2 * 9 + 3)
    # BAdam: one block (layer 7, descending) and nothing else: 9 tensors of state.
    assert runs["lm/badam"]["trainable_params"] == PER_LAYER
    assert runs["lm/badam"]["optimizer_state_bytes"] == 8 * PER_LAYER + 4 * 9
    # Backward FLOPs (measured steps 0 and 4, both in LISA's first period) against a plain PyTorch step.
    drawn = sample_layers(8, 2, 0, 0)
    frozen = [f"model.model.layers.{i}" for i in range(8) if i not in drawn]
    assert runs["lm/lisa"]["backward_flops"] == _backward_flops(frozen)
    assert runs["lm/badam"]["backward_flops"] == _backward_flops(
        ["model.model.embed_tokens", "model.model.layers.[0-6]", "model.model.norm", "model.lm_head"]
    )
    assert runs["lm/token_selection"]["backward_flops"] == _backward_flops([])  # a loss mask: the same backward
    assert runs["lm/token_selection"]["trainable_params"] == 2 * EMBED + 8 * PER_LAYER + 16
    tokens = BATCH * TINY["seq_len"]
    summary = json.loads((sweep / "2" / "techniques.json").read_text())
    assert summary == [["TokenSelection", [f"TokenSelection (loss, keep=0.6): backpropagated "
                                           f"{8 * round(0.6 * tokens)} of {8 * tokens} tokens"]]]  # fmt: skip
