"""The main job: train with partial backprop, configured by Hydra (``conf/``).

    python scripts/train.py                                       # plain training
    python scripts/train.py partial=freeze_then_unfreeze          # a technique preset
    python scripts/train.py trainer.devices=2 trainer.strategy=ddp_spawn
    python scripts/train.py --cfg job                             # print the composed config

It ends by printing the final metrics one per line as ``name: value`` and the table of what took part
in backprop. ``train(cfg)`` does the work and can be called from Python with a composed config.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lit_partial.conditions import ConditionError
from lit_partial.config import register_configs
from lit_partial.distributed import UnsupportedStrategyError
from lit_partial.selection import SelectorError
from lit_partial.summary import format_summary, summarize

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

#: Errors that mean "the configuration is wrong": reported as one message, without a traceback.
USER_ERRORS = (
    SelectorError,
    ConditionError,
    UnsupportedStrategyError,
    InstantiationException,
    MisconfigurationException,
    ValueError,
    TypeError,
)

register_configs()


def _instantiate_all(node: Any, kind: type, group: str) -> list[Any]:
    """Instantiate every ``_target_`` entry of a config group (a mapping of name -> config)."""
    if not node:
        return []
    objects = []
    for name, conf in node.items():
        if conf is None:  # an entry switched off from the command line: partial.freeze_backbone=null
            continue
        if not isinstance(conf, Mapping) or "_target_" not in conf:
            raise ValueError(f"{group}.{name} must be a config with a `_target_`, got {conf!r}.")
        obj = instantiate(conf)
        if not isinstance(obj, kind):
            raise TypeError(f"{group}.{name} built a {type(obj).__name__}, expected a {kind.__name__}.")
        objects.append(obj)
    return objects


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from ``cfg``, fit, print the final metrics and the backprop summary.

    Args:
        cfg: The composed config (``conf/config.yaml``); ``paths.output_dir`` must resolve.

    Returns:
        The final ``trainer.callback_metrics`` as floats (``val_acc``, ``val_loss``, ``train_loss``, ...).
    """
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    callbacks = _instantiate_all(cfg.get("callbacks"), Callback, "callbacks")
    callbacks += _instantiate_all(cfg.get("partial"), Callback, "partial")
    loggers = _instantiate_all(cfg.get("logger"), Logger, "logger")
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = cfg.trainer.get("strategy")
    if isinstance(strategy, Mapping) and "_target_" in strategy:  # a strategy object, e.g. trainer=fsdp
        trainer_kwargs["strategy"] = instantiate(strategy)  # type: ignore[index]
    trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False)  # type: ignore[arg-type]
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        print("\nfinal metrics:")
        for name, value in sorted(metrics.items()):
            print(f"{name}: {value:.6g}")
        print("\nwhat took part in backprop:")
        print(format_summary(summarize(model)))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: configuration errors become one message and exit status 2."""
    try:
        train(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(
            f"Error: {err}\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
