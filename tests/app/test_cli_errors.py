"""Every configuration error of the main job: one line on stderr, exit status 2, no traceback, nothing run.

Each case runs the real CLI (``scripts/train.py``, the shim of ``lit-partial-train``, as ``__main__``) in a
child process with a timeout: forked from the test process for the cases that stop at a configuration error (no
10 s of imports per case), a fresh interpreter for the rest (a ddp_spawn run, a user's bug,
``HYDRA_FULL_ERROR=1``), which also checks the forked runs against a real command line. A bug in a model, by
contrast, keeps its traceback and exits with 1.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import assert_config_error, run_job, run_job_forked

QUIET = ("trainer.enable_progress_bar=false", "trainer.enable_model_summary=false")
NO_PRETRAIN = ("pretrain.enabled=false",)


def assert_nothing_trained(run_dir: Path) -> None:
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "costs.json").exists()


COMPOSITION_CASES = [
    ("trainer.max_epoch=1", r"unknown key 'trainer.max_epoch'; did you mean trainer.max_epochs"),
    ("lr=1e-3", r"unknown key 'lr'; did you mean model.lr"),
    ("model.lrr=1e-3", r"unknown key 'model.lrr'; did you mean model.lr"),
    ("model.lr=abc", r"model.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    ("data.batch_size=x", r"data.batch_size=x: Value 'x' of type 'str' could not be converted to Integer"),
    (
        "partial.freeze_backbone.frozen=backbone.0",
        r"partial.freeze_backbone belongs to the partial preset 'freeze_backbone', which is not selected: "
        r"add partial=freeze_backbone",
    ),
    (
        "partial=freez_backbone",
        r"partial=freez_backbone: there is no such partial config; choose one of .*freeze_backbone",
    ),
    ("ckpt_path=/no/such/dir/last.ckpt", r"ckpt_path='/no/such/dir/last.ckpt' is not a file"),
    ("ckpt_path=/no/such/dir/epoch=0-step=8.ckpt", r"ckpt_path='/no/such/dir/epoch=0-step=8.ckpt' is not a file"),
    ("model.lr=nan", r"`lr` must be a finite number > 0, got nan"),
    ("model.lr=inf", r"`lr` must be a finite number > 0, got inf"),
    ("model.lr=-1", r"`lr` must be a finite number > 0, got -1"),
    ("data.classes=[5]", r"`classes` must list at least two different digits"),
    (
        "logger=none callbacks.learning_rate_monitor.logging_interval=step",
        r"callbacks.learning_rate_monitor \(LearningRateMonitor\) is set on the command line "
        r"\(callbacks.learning_rate_monitor.logging_interval=...\), but no logger is configured.*logger=csv",
    ),
    (
        "logger=none +callbacks.lr={_target_:lightning.pytorch.callbacks.LearningRateMonitor}",
        r"callbacks.lr \(LearningRateMonitor\) is set on the command line \(callbacks.lr=...\)",
    ),
    ("pretrain.classes=[4,5]", r"pretrain.classes \[4, 5\] and data.classes \[5, 6, 7, 8, 9\] share digits \[5\]"),
    ("model=digits_rnn", r"pretrain.transfer=.backbone. matches no parameter or buffer of DigitsRNN.*enabled=false"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("override", "pattern"), COMPOSITION_CASES, ids=[c[0] for c in COMPOSITION_CASES])
def test_configuration_error_is_one_line_with_exit_status_2(tmp_path: Path, override: str, pattern: str) -> None:
    extra = () if override.startswith(("pretrain.", "model=")) else NO_PRETRAIN
    proc = run_job_forked(*override.split(" "), *extra, *QUIET, run_dir=tmp_path)
    assert_config_error(proc, pattern)
    assert_nothing_trained(tmp_path)


TECHNIQUE_CASES = [
    (
        ("partial=freeze_backbone", "partial.freeze_backbone.frozen=backbonez"),
        r"(?i)backbonez.*(did you mean|closest).*backbone",
    ),
    (
        ("partial=detach_backbone_warmup", "partial.detach_backbone_warmup.rules.features=1.0"),
        r"invalid condition 1.0: a bare number is not a condition",
    ),
    (
        ("partial=detach_backbone_warmup", "partial.detach_backbone_warmup.rules.features=0"),
        r"invalid condition 0: a bare number is not a condition",
    ),
    (
        ("partial=positive_only", "partial.positive_only.masks={backbone.*.0.weight:{kind:where,op:'>',value:nan}}"),
        r"value=nan must be a number, and finite",
    ),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("overrides", "pattern"), TECHNIQUE_CASES, ids=["selector", "condition-1.0", "condition-0", "where-nan"]
)
def test_technique_configuration_errors_stop_before_the_first_step(
    tmp_path: Path, overrides: tuple[str, ...], pattern: str
) -> None:
    proc = run_job_forked(*overrides, *NO_PRETRAIN, *QUIET, "logger=none", "callbacks=none", run_dir=tmp_path)
    assert_config_error(proc, pattern)
    assert "Epoch 0" not in proc.stdout


@pytest.mark.timeout(180)
def test_mask_file_that_is_not_a_mask_is_one_line(tmp_path: Path) -> None:
    text = tmp_path / "mask.txt"
    text.write_text("1 0 1\n")
    proc = run_job_forked(
        "partial=embedding_rows",
        f"partial.embedding_rows.masks={{head.1:'{text}'}}",
        *NO_PRETRAIN,
        *QUIET,
        "logger=none",
        "callbacks=none",
        run_dir=tmp_path / "run",
    )
    assert_config_error(proc, r"is not a torch-saved mask file")


@pytest.mark.timeout(300)
def test_ddp_spawn_configuration_error_is_the_same_one_line(tmp_path: Path) -> None:
    overrides = ("partial=freeze_backbone", "partial.freeze_backbone.frozen=backbonez", *NO_PRETRAIN, *QUIET)
    single = run_job(*overrides, "logger=none", "callbacks=none", run_dir=tmp_path / "one")
    spawned = run_job(
        *overrides,
        "logger=none",
        "callbacks=none",
        "trainer.devices=2",
        "trainer.strategy=ddp_spawn",
        run_dir=tmp_path / "two",
    )
    line = assert_config_error(single, r"backbonez")
    assert assert_config_error(spawned, r"backbonez") == line


@pytest.mark.timeout(180)
def test_a_bug_in_a_model_keeps_its_traceback(tmp_path: Path) -> None:
    proc = run_job(
        "model._target_=tests.helpers.cli_targets.BuggyClassifier",
        "extra_target_roots=[tests.helpers.cli_targets]",
        *NO_PRETRAIN,
        *QUIET,
        "logger=none",
        "callbacks=none",
        run_dir=tmp_path,
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ZeroDivisionError: a bug in training_step" in proc.stderr
    assert not proc.stderr.splitlines()[-1].startswith("Error: ")


@pytest.mark.timeout(120)
def test_hydra_full_error_shows_the_traceback_of_a_configuration_error(tmp_path: Path) -> None:
    proc = run_job("model.lr=nan", *NO_PRETRAIN, run_dir=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "must be a finite number" in proc.stderr
