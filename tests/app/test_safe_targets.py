"""Configs can only build what they are meant to: hostile `_target_`s are refused before anything is called."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lit_partial.config import check_targets, resolve_target
from lit_partial.errors import ConfigurationError
from tests.helpers.cli import assert_config_error, run_job_forked

QUIET = ("pretrain.enabled=false", "trainer.enable_progress_bar=false", "logger=none", "callbacks=none")


def hostile_cases(tmp: Path) -> list[tuple[str, str, Path]]:
    """(override, expected message, file the target would write) for each hostile config of issue 15."""
    victim = tmp / "victim.txt"
    return [
        (
            f"+partial.x={{_target_:torch.load,f:'{tmp / 'evil.pt'}',weights_only:false}}",
            r"partial.x._target_='torch.load' is not allowed: targets must come from lit_partial, ",
            tmp / "never.txt",
        ),
        (
            f"+partial.x={{_target_:builtins.open,file:'{victim}',mode:w}}",
            r"partial.x._target_='builtins.open' is not allowed",
            victim,
        ),
        (
            f"+partial.x={{_target_:torch.save,obj:1,f:'{tmp / 'saved.pt'}'}}",
            r"partial.x._target_='torch.save' is not allowed",
            tmp / "saved.pt",
        ),
        (
            f"+callbacks.x={{_target_:numpy.savetxt,fname:'{tmp / 'saved.txt'}',X:[1,2]}}",
            r"callbacks.x._target_='numpy.savetxt' is not allowed",
            tmp / "saved.txt",
        ),
        (
            f"+logger.x={{_target_:torch.hub.load,repo_or_dir:'{tmp}',model:m,source:local}}",
            r"logger.x._target_='torch.hub.load' is not allowed",
            tmp / "hubconf.py",
        ),
        (  # nested inside an allowed target
            f"+partial.freeze_backbone.frozen={{_target_:torch.save,obj:1,f:'{tmp / 'nested.pt'}'}}",
            r"partial.freeze_backbone.frozen._target_='torch.save' is not allowed",
            tmp / "nested.pt",
        ),
        (  # the model group
            "model._target_=torch.save",
            r"model._target_='torch.save' is not allowed",
            tmp / "never2.txt",
        ),
        (  # Hydra's own callbacks run before the job: checked before Hydra starts
            f"+hydra.callbacks.x={{_target_:torch.save,obj:1,f:'{tmp / 'hydra.pt'}'}}",
            r"hydra.callbacks.x._target_='torch.save' is not allowed",
            tmp / "hydra.pt",
        ),
        (
            f"+partial.x={{_target_:torch.save,obj:1,f:'{tmp / 'broad.pt'}'}} extra_target_roots=[torch]",
            r"extra_target_roots: 'torch' is refused: it is too broad",
            tmp / "broad.pt",
        ),
    ]


IDS = [
    "torch.load",
    "builtins.open-w",
    "torch.save",
    "numpy.savetxt",
    "torch.hub.load",
    "nested",
    "model",
    "hydra.callbacks",
    "broad-root",
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("index", range(len(IDS)), ids=IDS)
def test_hostile_target_is_refused_and_writes_nothing(tmp_path: Path, index: int) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    override, pattern, written = hostile_cases(tmp_path)[index]
    extra = ("partial=freeze_backbone",) if "freeze_backbone" in override else ()
    proc = run_job_forked(*override.split(" "), *extra, *QUIET, run_dir=tmp_path / "run")
    assert_config_error(proc, pattern)
    assert victim.read_text() == "precious\n"
    assert not written.exists() or written == victim


def test_allowed_targets_resolve_to_classes_of_their_group() -> None:
    cfg = OmegaConf.create(
        {
            "model": {"_target_": "lit_partial.demos.DigitsClassifier"},
            "partial": {"f": {"_target_": "lit_partial.LayerFreezing", "frozen": "backbone"}},
            "callbacks": {"c": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint"}},
            "logger": {"csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": "x"}},
            "trainer": {"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}},
        }
    )
    found = check_targets(cfg)
    assert set(found) == {"model", "partial.f", "callbacks.c", "logger.csv", "trainer.strategy"}


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (
            {"partial": {"x": {"_target_": "lit_partial.demos.DigitsClassifier"}}},
            r"is a DigitsClassifier, but partial.x must be a Callback",
        ),
        ({"model": {"_target_": "lit_partial.LayerFreezing"}}, r"model must be a LightningModule"),
        (
            {"partial": {"x": {"_target_": "lit_partial.LayerFreez"}}},
            r"cannot be resolved: .*did you mean lit_partial.LayerFreezing",
        ),
        ({"partial": {"x": {"_target_": "lit_partial.functional.freeze"}}}, r"is a function, not a class"),
        ({"partial": {"x": {"_target_": "lit_partial._plain.to_plain"}}}, r"private names"),
        ({"partial": {"x": {"_target_": "not a path"}}}, r"must be a dotted import path"),
        (
            {"partial": {"x": {"_target_": "lit_partial.LayerFreezing", "_partial_": True}}},
            r"_partial_=true is not allowed",
        ),
        ({"model": {"_target_": "os.system"}}, r"model._target_='os.system' is not allowed"),
    ],
)
def test_check_targets_errors(cfg: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        check_targets(OmegaConf.create(cfg))


@pytest.mark.parametrize("root", ["torch", "numpy", "builtins", "os.path", "torch.hub", "lightning", "x y"])
def test_too_broad_or_unsafe_extra_roots_are_refused(root: str) -> None:
    with pytest.raises(ConfigurationError, match=r"extra_target_roots: "):
        check_targets(OmegaConf.create({}), extra_roots=[root])


def test_an_explicit_extra_root_allows_its_classes() -> None:
    assert (
        resolve_target("callbacks.k", "tests.helpers.cli_targets.KillAt", ("tests.helpers.cli_targets",)).__name__
        == "KillAt"
    )
    with pytest.raises(ConfigurationError, match=r"add their package explicitly: \+extra_target_roots"):
        check_targets(OmegaConf.create({"callbacks": {"k": {"_target_": "tests.helpers.cli_targets.KillAt"}}}))
    found = check_targets(
        OmegaConf.create({"callbacks": {"k": {"_target_": "tests.helpers.cli_targets.KillAt"}}}),
        extra_roots=["tests.helpers.cli_targets"],
    )
    assert list(found) == ["callbacks.k"]
