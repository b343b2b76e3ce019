"""Exact resume of the main job from the command line, after a SIGKILL at any step.

Each SIGKILL test runs the real CLI three ways with the same overrides, each in a fresh interpreter: uninterrupted;
killed (the whole process group, SIGKILL) at a step; resumed from the killed run's ``last.ckpt``. Every parameter
and buffer at the end of the resumed run must equal the uninterrupted run's, bit for bit (CPU, deterministic
kernels). The other tests run the CLI in children forked from the test process (no 10 s of imports per run).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import ROOT, assert_config_error, run_job, run_job_forked

pytestmark = [pytest.mark.slow]

#: A short job that checkpoints after every optimizer step (last.ckpt), with the pretrained-backbone stage.
FAST = (
    "trainer.max_epochs=2",
    "data.batch_size=96",  # 719 training images: 8 batches per epoch
    "callbacks.last_checkpoint.every_n_train_steps=1",
    "callbacks.learning_rate_monitor=null",
    "logger=none",
    "pretrain.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)
STEPS_PER_EPOCH = 8
ALL_TECHNIQUES = (
    "partial=[gradual_unfreeze,embedding_rows,detach_backbone_warmup,stochastic_depth,selective_backprop,memory_monitor]",
    "model.residual_blocks=2",
    "partial.gradual_unfreeze.schedule=[{epoch:1,unfreeze:backbone.2,lr_scale:0.5},{step:12,unfreeze:backbone}]",
    "partial.detach_backbone_warmup.rules.features.epochs=[0,1]",
)
TWO_PROCESSES = ("trainer.devices=2", "trainer.strategy=ddp_spawn")


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ after resume: {different[:5]}"


def kill_then_resume(tmp_path: Path, overrides: tuple[str, ...], killer: str, pretrain_cache: Path) -> Path:
    common = (*FAST, f"pretrain.cache_dir={pretrain_cache}", *overrides)
    killed = tmp_path / "killed"
    proc = run_job(
        *common,
        f"+callbacks.killer={{_target_:tests.helpers.cli_targets.KillAt,{killer}}}",
        "extra_target_roots=[tests.helpers.cli_targets]",
        run_dir=killed,
        new_session=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    resumed = tmp_path / "resumed"
    proc = run_job(*common, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}", run_dir=resumed)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return resumed


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory, pretrain_cache: Path) -> dict[tuple[str, ...], Path]:
    """Uninterrupted runs, one per override set, made on first use."""
    root = tmp_path_factory.mktemp("reference")
    runs: dict[tuple[str, ...], Path] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, key: tuple[str, ...]) -> Path:
            run_dir = root / f"run{len(runs)}"
            proc = run_job(*FAST, f"pretrain.cache_dir={pretrain_cache}", *key, run_dir=run_dir)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[key] = run_dir
            self[key] = run_dir
            return run_dir

    return Lazy()


MID_EPOCH_STEP = random.Random(15).choice([s for s in range(1, 2 * STEPS_PER_EPOCH) if s % STEPS_PER_EPOCH])


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("overrides", "killer"),
    [
        pytest.param((), f"step:{MID_EPOCH_STEP}", id=f"plain-mid-epoch-step{MID_EPOCH_STEP}"),
        pytest.param((), "epoch:0", id="plain-last-step-of-epoch0"),
        pytest.param(("partial=freeze_then_unfreeze",), "step:11", id="freeze_then_unfreeze-mid-epoch1"),
        # LayerFreezing's `epoch: 1` entry must still apply after a resume from the last batch of epoch 0.
        pytest.param(("partial=freeze_then_unfreeze",), "epoch:0", id="freeze_then_unfreeze-last-step-of-epoch0"),
        pytest.param(ALL_TECHNIQUES, "step:5", id="all-techniques-mid-epoch0"),
        pytest.param(TWO_PROCESSES, "step:3", id="ddp_spawn-2-processes-mid-epoch0"),
    ],
)
def test_sigkill_then_resume_is_bit_identical(
    tmp_path: Path,
    overrides: tuple[str, ...],
    killer: str,
    reference_runs: dict[tuple[str, ...], Path],
    pretrain_cache: Path,
) -> None:
    resumed = kill_then_resume(tmp_path, overrides, killer, pretrain_cache)
    assert_bit_identical(final_state(reference_runs[overrides]), final_state(resumed))


@pytest.mark.timeout(600)
def test_every_checkpoint_the_job_writes_loads_safely_and_resumes(tmp_path: Path, pretrain_cache: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_job_forked(*FAST, f"pretrain.cache_dir={pretrain_cache}", "trainer.max_epochs=1", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert len(ckpts) == 2 and all("=" not in p.name for p in ckpts), ckpts
    for path in ckpts:  # weights_only=True: only tensors and plain types inside (no ListConfig)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        assert isinstance(ckpt["hyper_parameters"]["channels"], list)
    best = next(p for p in ckpts if p.name != "last.ckpt")
    proc = run_job_forked(
        *FAST, f"pretrain.cache_dir={pretrain_cache}", f"ckpt_path={best}", run_dir=tmp_path / "again"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(300)
def test_checkpoint_names_with_equals_signs_are_accepted(tmp_path: Path, pretrain_cache: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_job_forked(*FAST, f"pretrain.cache_dir={pretrain_cache}", "trainer.max_epochs=1", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lightning_name = run_dir / "checkpoints" / "epoch=0-step=8.ckpt"  # Lightning's default naming
    (run_dir / "checkpoints" / "last.ckpt").rename(lightning_name)
    proc = run_job_forked(
        *FAST, f"pretrain.cache_dir={pretrain_cache}", f"ckpt_path={lightning_name}", run_dir=tmp_path / "b"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Restored all states from the checkpoint" in proc.stdout + proc.stderr


def test_helpers_run_the_real_cli() -> None:
    assert (ROOT / "scripts" / "train.py").is_file() and sys.executable
    assert subprocess.run([sys.executable, "-c", "pass"], timeout=60).returncode == 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("first", "changed", "pattern"),
    [
        (
            ("partial=sparse_finetune",),
            (
                "partial=sparse_finetune",
                "partial.sparse_finetune.masks={backbone.*.0.weight:{kind:random,keep:0.2,seed:0}}",
            ),
            r"GradientMasking.*different configuration.*accept_config_change=True",
        ),
        (
            ("partial=sparse_finetune",),
            (),
            r"checkpoint holds the state of a GradientMasking.*which this run does not have",
        ),
        ((), ("data.batch_size=64",), r"different data settings \(batch_size 96 -> 64\)"),
    ],
    ids=["masking-changed", "masking-removed", "batch-size-changed"],
)
def test_resuming_with_a_changed_configuration_is_a_one_line_error(
    tmp_path: Path, pretrain_cache: Path, first: tuple[str, ...], changed: tuple[str, ...], pattern: str
) -> None:
    common = (*FAST, f"pretrain.cache_dir={pretrain_cache}", "trainer.max_epochs=1", "trainer.limit_train_batches=3")
    proc = run_job_forked(*common, *first, run_dir=tmp_path / "first")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    proc = run_job_forked(*common, *changed, f"ckpt_path={ckpt}", "trainer.max_epochs=2", run_dir=tmp_path / "second")
    assert_config_error(proc, pattern)
