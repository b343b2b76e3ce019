"""The main job: transfer learning on digits with partial backprop, configured by Hydra (``conf/``).

    lit-partial-train partial=freeze_backbone                # fine-tune only the head of a pretrained CNN
    lit-partial-train -m partial=none,freeze_backbone,gradual_unfreeze   # + comparison.md/.png
    lit-partial-train ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt   # resume, exactly
    lit-partial-train --cfg job                              # print the composed config

``lit-partial-train`` is this module's :func:`main` (also ``python -m lit_partial.app.train``, and
``python scripts/train.py`` in a checkout). Stage 1 pretrains the model on digits 0-4 (``pretrain``; cached, see
:mod:`lit_partial.app.pretrain`), stage 2 fine-tunes it on digits 5-9 with the techniques of ``partial``. Every
``_target_`` is checked before anything is built (:func:`lit_partial.config.check_targets`). The run ends by
printing the final metrics one per line as ``name: value``, the table of what took part in backprop, what each
technique did, and the output folder; the same lines are in ``<output folder>/train.log``. :func:`train` does
the work and can be called from Python with a composed config.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig, OmegaConf

from lit_partial.app.cli import is_config_error, run_cli
from lit_partial.app.compare import saved_bytes
from lit_partial.app.config import CONF_DIR, register_configs
from lit_partial.app.pretrain import ensure_pretrained, load_pretrained
from lit_partial.app.resume import RngState
from lit_partial.callbacks.base import Technique
from lit_partial.callbacks.cost_monitor import CostMonitor
from lit_partial.config import check_targets
from lit_partial.errors import ConfigurationError
from lit_partial.summary import format_summary, summarize

__all__ = ["TechniqueReport", "check_config", "hydra_main", "main", "train", "unlogged_monitors"]

GROUPS = ("model", "data", "partial", "callbacks", "logger", "trainer")

log = logging.getLogger("train")

register_configs()

#: Lightning messages and warnings that say nothing about this job (tips, accelerator banners, the tiny data set).
_NOISE = (
    "Tip:",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "You are using a CUDA device",
    "does not have many workers",
    "is smaller than the logging interval",
    "litlogger",
    "LeafSpec",
    "GPU available but not used",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(marker in message for marker in _NOISE)


def _configure_logging() -> logging.Handler | None:
    """Route Lightning's messages and Python warnings into the job's log; silence the noise.

    Under Hydra (``lit-partial-train``) the job's handlers write the console and ``train.log``. Called from
    Python without Hydra, a plain stdout handler is added to the ``train`` logger and returned, to be removed.
    """
    for marker in _NOISE:
        warnings.filterwarnings("ignore", message=f".*{marker}.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the libraries' upcoming removals are not news
    # ... but ours are: an old config naming a deprecated lit_partial path says what to write instead.
    warnings.filterwarnings("default", message=r".*\blit_partial\b", category=DeprecationWarning)
    log.setLevel(logging.INFO)
    if not HydraConfig.initialized():
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        return handler
    logging.captureWarnings(True)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # their own stderr handlers: log via root
        lightning_log = logging.getLogger(name)
        for h in list(lightning_log.handlers):
            lightning_log.removeHandler(h)
        lightning_log.propagate = True
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _DropNoise) for f in h.filters):
            h.addFilter(_DropNoise())
    return None


def _instantiate_group(node: Any, group: str, leave_out: Sequence[str] = ()) -> list[Any]:
    """Instantiate every entry of a ``name -> config`` group (targets were checked by ``check_config``)."""
    if not node:
        return []
    objects = []
    for name, conf in node.items():
        if conf is None or name in leave_out:  # an entry switched off from the command line: partial.x=null
            continue
        if not hasattr(conf, "keys") or "_target_" not in conf:
            raise ConfigurationError(
                f"{group}.{name} must be a config with a `_target_`, got {conf!r}; or null to switch it off."
            )
        objects.append(instantiate(conf, _convert_="all"))
    return objects


def _overridden_keys() -> list[str]:
    """The keys the command line sets (``+callbacks.x={...}`` -> ``callbacks.x``); none outside a Hydra run."""
    if not HydraConfig.initialized():
        return []
    return [override.partition("=")[0].lstrip("+~") for override in HydraConfig.get().overrides.task]


def unlogged_monitors(cfg: DictConfig, targets: dict[str, type]) -> list[str]:
    """The ``callbacks`` entries that log learning rates (``LearningRateMonitor``) while no logger is configured.

    Args:
        cfg: The composed config.
        targets: ``{key: class}`` of its targets, as :func:`lit_partial.config.check_targets` returns them.
    """
    if any(c is not None for c in (cfg.get("logger") or {}).values()):
        return []
    return [
        key.partition(".")[2]
        for key, cls in targets.items()
        if key.startswith("callbacks.") and key.count(".") == 1 and issubclass(cls, LearningRateMonitor)
    ]


def check_config(cfg: DictConfig) -> list[str]:
    """Everything that can be checked before anything is built.

    Returns:
        The ``callbacks`` entries to leave out: learning-rate monitors that came with the callbacks preset while no
        logger is configured (``logger=none``); they would have nothing to log to.

    Raises:
        ConfigurationError: A ``_target_`` outside the allowed roots or of the wrong kind (naming the key), a group
            entry without ``_target_``, a ``ckpt_path`` that is not a file, a learning-rate monitor set on the
            command line (``callbacks.learning_rate_monitor...=``) without a logger.
    """
    targets = check_targets(cfg, extra_roots=list(cfg.get("extra_target_roots") or ()), groups=GROUPS)
    for group in ("partial", "callbacks", "logger"):
        for name, conf in (cfg.get(group) or {}).items():
            if conf is not None and (not hasattr(conf, "keys") or "_target_" not in conf):
                raise ConfigurationError(
                    f"{group}.{name} must be a config with a `_target_`, got {conf!r}; or null to switch it off."
                )
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not Path(ckpt).is_file():
        raise ConfigurationError(
            f"ckpt_path={ckpt!r} is not a file; pass a checkpoint the job wrote, e.g. "
            "ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt."
        )
    monitors = unlogged_monitors(cfg, targets)
    overridden = _overridden_keys()
    for name in monitors:
        key = f"callbacks.{name}"
        asked = next((k for k in overridden if k == key or k.startswith(f"{key}.")), None)
        if asked is not None:
            raise ConfigurationError(
                f"{key} (LearningRateMonitor) is set on the command line ({asked}=...), but no logger is configured "
                f"and it logs to one; keep a logger (e.g. logger=csv), or drop the {asked} override."
            )
    return monitors


def _output_dir(cfg: DictConfig) -> Path:
    return Path(str(cfg.paths.output_dir))


class TechniqueReport(Callback):
    """Writes every technique's ``run_summary()`` to a JSON file on rank 0 at the end of fit.

    The techniques that trained live in the worker processes under ``ddp_spawn``, not in the process that
    prints the report, so their summaries travel through this file (like the costs in ``costs.json``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.is_global_zero:
            summaries = [
                [type(cb).__name__, list(cb.run_summary())]
                for cb in trainer.callbacks  # type: ignore[attr-defined]
                if isinstance(cb, Technique)
            ]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(summaries, indent=2) + "\n")


def _run_name(cfg: DictConfig) -> str:
    if HydraConfig.initialized():
        # As written on the command line: a list with a preset of another package (partial=[lm/lora,lora_fa],
        # lm/lora is `@package _global_`) has only its other presets in runtime.choices["partial"].
        for override in HydraConfig.get().overrides.task:
            key, _, value = override.partition("=")
            if key == "partial":
                return value.strip("[]").replace(" ", "") or "none"
        choice = HydraConfig.get().runtime.choices.get("partial")
        if choice:
            return str(choice).strip("[]").replace(" ", "") or "none"
    return ",".join(cfg.get("partial") or {}) or "none"


def train(cfg: DictConfig, extra_callbacks: tuple[Callback, ...] = ()) -> dict[str, float]:
    """Check ``cfg``, pretrain (or reuse the cache), build everything, fine-tune, print and log the results.

    Args:
        cfg: The composed config (``conf/train.yaml``); ``paths.output_dir`` must resolve.
        extra_callbacks: Callbacks added after the configured ones (tests use this).

    Returns:
        The final ``trainer.callback_metrics`` as floats (``val_acc``, ``val_loss``, ``train_loss``, ...).
    """
    handler = _configure_logging()
    try:
        return _train(cfg, extra_callbacks)
    finally:
        if handler is not None:
            log.removeHandler(handler)


def _train(cfg: DictConfig, extra_callbacks: tuple[Callback, ...]) -> dict[str, float]:
    left_out = check_config(cfg)
    if left_out:
        names = ", ".join(f"callbacks.{n}" for n in left_out)
        log.info(f"no logger configured: leaving out {names} (a LearningRateMonitor needs a logger to log to)")
    resuming = cfg.get("ckpt_path") is not None
    pretrained = None if resuming else ensure_pretrained(cfg)
    if cfg.get("seed") is not None:  # after pretraining: the same draws whether the cache existed or not
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    if pretrained is not None:
        copied = load_pretrained(model, pretrained, cfg.pretrain.transfer)
        task = f"digits {list(cfg.data.get('classes') or range(10))}"
        if cfg.pretrain.get("data"):  # the LLM job (experiment=lm): a data domain, not digits
            task = f"{type(datamodule).__name__}({', '.join(f'{k}={cfg.data[k]}' for k in cfg.pretrain.data)})"
        log.info(f"fine-tuning on {task} from {copied} pretrained tensors")
    technique_callbacks = _instantiate_group(cfg.get("partial"), "partial")
    callbacks: list[Callback] = [RngState(), *_instantiate_group(cfg.get("callbacks"), "callbacks", left_out)]
    callbacks += technique_callbacks
    loggers = _instantiate_group(cfg.get("logger"), "logger")
    out = _output_dir(cfg)
    if cfg.costs.enabled:
        try:
            costs = CostMonitor(every_n_steps=cfg.costs.every_n_steps, path=out / "costs.json", name=_run_name(cfg))
        except ConfigurationError as err:
            raise ConfigurationError(f"costs.every_n_steps: {err}") from None
        callbacks.append(costs)
    callbacks += [TechniqueReport(out / "techniques.json"), *extra_callbacks]
    trainer_kwargs: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    if isinstance(trainer_kwargs.get("strategy"), dict):
        trainer_kwargs["strategy"] = instantiate(trainer_kwargs["strategy"], _convert_="all")
    trainer = L.Trainer(**trainer_kwargs, callbacks=callbacks, logger=loggers or False)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if trainer.is_global_zero:
        _report(cfg, model, metrics, out)
    return metrics


def _report(cfg: DictConfig, model: Any, metrics: dict[str, float], out: Path) -> None:
    if any(math.isnan(v) or math.isinf(v) for k, v in metrics.items() if "loss" in k):
        log.warning("warning: a loss is not finite; lower model.lr or check the data.")
    lines = ["", "final metrics:", *(f"{name}: {value:.6g}" for name, value in sorted(metrics.items()))]
    lines += ["", "what took part in backprop (at the end of the run):", format_summary(summarize(model))]
    report = out / "techniques.json"
    for name, summary in json.loads(report.read_text()) if report.is_file() else []:
        lines += ["", f"{name} over the run:", *(f"  {line}" for line in summary)]
    costs = out / "costs.json"
    if costs.is_file():
        c = json.loads(costs.read_text())
        lines += [
            "",
            f"costs per step: backward {c['backward_flops'] / 1e6:.3g} MFLOPs, forward {c['forward_flops'] / 1e6:.3g} "
            f"MFLOPs, saved activations {saved_bytes(c) / 1024:.0f} KiB, trainable parameters "
            f"{c['trainable_params']:,.0f}, optimizer state {c['optimizer_state_bytes'] / 1024:.0f} KiB, "
            f"{c['step_time_ms']:.1f} ms",
        ]
    lines += ["", f"output folder: {out}"]
    for line in lines:
        log.info(line)


#: Configuration errors of jobs, reported by run_cli after Hydra returns (Hydra would add its own banner).
_JOB_ERRORS: list[BaseException] = []


# An absolute path (Hydra reads it as a folder): "conf" would be read as the module lit_partial.app.conf, which
# Hydra accepts only with an __init__.py in it.
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    """The Hydra task: :func:`train`, its configuration errors kept for :func:`main` to report as one line."""
    try:
        train(cfg)
    except Exception as exc:
        if not is_config_error(exc):
            raise
        _JOB_ERRORS.append(exc)


def main() -> None:
    """``lit-partial-train``: the main job's command line (Hydra's, with one-line configuration errors).

    See :func:`lit_partial.app.cli.run_cli`: a configuration error prints ``Error: <one line>`` and exits with 2.
    """
    run_cli(hydra_main, job_errors=_JOB_ERRORS)


if __name__ == "__main__":
    main()
