"""The SLURM launcher preset (``conf/hydra/launcher/slurm.yaml`` of lit_partial.app) composes; no cluster needed."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lit_partial.app.config import CONF_DIR as CONF
from lit_partial.app.config import register_configs

register_configs()
# The preset's defaults name the plugin's config; without the `slurm` extra it cannot compose at all.
pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs pip install -e ".[slurm]"')


def test_slurm_preset_follows_the_trainer_layout(tmp_path: Path) -> None:
    overrides = ["hydra/launcher=slurm", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert isinstance(launcher, dict)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["partition"]) == (2, 4, "gpu")
    assert cfg.trainer.num_nodes == 2  # passes through to lightning.Trainer(num_nodes=...)
    # Every key is one the plugin's config knows (a typo would fail at submission, on the cluster).
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    assert set(launcher) <= set(SlurmQueueConf.__dataclass_fields__)


def test_num_nodes_defaults_to_one_node() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/x", "hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.trainer.num_nodes == 1 and cfg.hydra.launcher.nodes == 1
