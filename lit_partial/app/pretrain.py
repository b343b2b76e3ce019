"""Stage 1 of the main job: pretrain the model on other digits once, cache its backbone, reuse it.

The cache file is ``<pretrain.cache_dir>/digits<classes>-<hash>.pt``, where the hash covers everything that
changes the pretrained weights (the model and data settings, the pretraining settings and the seed). A later
run with the same settings reuses it; ``pretrain.force=true`` trains again. The file holds only tensors and
plain values (``torch.load(..., weights_only=True)`` reads it) and is written atomically, so parallel jobs
never read half a file.

``pretrain.data`` and ``pretrain.model`` replace settings of the data and model for this stage only (the LLM job,
``experiment=lm``: ``data: {domain: code}`` pretrains on Python source, ``model: {lora_rank: 0}`` without
adapters); a non-empty ``pretrain.data`` takes the place of ``pretrain.classes``, and the file is then
``<model class>-<data values>-<hash>.pt``. A model with a ``pretrained_names()`` method (``{cached name: own
name}``) receives the cached tensors under its own names (``ByteLM`` under PEFT LoRA).

Example:
    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.create({"model": {"lr": 1e-3, "num_classes": 5}, "data": {"classes": [5, 6]},
    ...                         "pretrain": {"classes": [0, 1], "max_epochs": 1, "transfer": "backbone",
    ...                                      "cache_dir": "c", "force": False, "enabled": True}, "seed": 0,
    ...                         "trainer": {"precision": None, "deterministic": True}})
    >>> cache_path(cfg).name.startswith("digits01-")
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lit_partial.errors import ConfigurationError

__all__ = ["cache_path", "ensure_pretrained", "load_pretrained"]

log = logging.getLogger("train")

#: Settings that do not change the pretrained weights (left out of the cache key).
_NOT_IN_KEY = {
    "model": ("num_classes",),
    "data": ("classes", "num_workers", "batch_size"),
    "pretrain": ("cache_dir", "force"),
}


def _stage_overrides(cfg: DictConfig, group: str) -> dict[str, Any]:
    """``pretrain.<group>``: the settings of ``group`` the pretraining stage uses instead of the fine-tuning ones."""
    node = OmegaConf.to_container(cfg.pretrain.get(group) or {}, resolve=True)
    assert isinstance(node, dict)
    return {str(k): v for k, v in node.items()}


def _key_settings(cfg: DictConfig) -> dict[str, Any]:
    settings: dict[str, Any] = {"seed": cfg.get("seed")}
    for group in ("model", "data", "pretrain"):
        node = OmegaConf.to_container(cfg[group], resolve=False)
        assert isinstance(node, dict)
        if group != "pretrain":  # the settings the pretraining really uses
            node.update(_stage_overrides(cfg, group))
        skip = (*_NOT_IN_KEY[group], "defaults", *(("data", "model") if group == "pretrain" else ()))
        settings[group] = {k: v for k, v in node.items() if k not in skip}
    settings["trainer"] = {k: cfg.trainer.get(k) for k in ("precision", "deterministic")}
    return settings


def _stage_name(cfg: DictConfig) -> str:
    """What the pretraining trains on, for messages: ``digits [0, 1, 2, 3, 4]`` or ``domain=code, ...``."""
    data = _stage_overrides(cfg, "data")
    if not data:
        return f"digits {list(cfg.pretrain.classes)}"
    return ", ".join(f"{k}={v}" for k, v in data.items())


def cache_path(cfg: DictConfig) -> Path:
    """Where the pretrained weights of ``cfg``'s settings are cached."""
    digest = hashlib.sha256(json.dumps(_key_settings(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]
    data = _stage_overrides(cfg, "data")
    if data:  # e.g. bytelm-code-<hash>.pt
        model = str(cfg.model.get("_target_", "model")).rpartition(".")[2].lower()
        tag = "-".join(re.sub(r"\W", "", str(v)) for v in (model, *data.values()) if v is not None)
        return Path(cfg.pretrain.cache_dir) / f"{tag}-{digest}.pt"
    classes = "".join(str(c) for c in cfg.pretrain.classes)
    return Path(cfg.pretrain.cache_dir) / f"digits{classes}-{digest}.pt"


def _metrics_text(meta: dict[str, Any]) -> str:
    metrics = meta.get("metrics") or {"val_acc": meta.get("val_acc", float("nan"))}
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))


def ensure_pretrained(cfg: DictConfig) -> Path | None:
    """Return the cached pretrained weights for ``cfg``, pretraining first if there are none (or if forced).

    Returns:
        The cache file, or ``None`` when ``pretrain.enabled`` is false.

    Raises:
        ConfigurationError: If ``pretrain.classes`` overlap ``data.classes`` (nothing would be transferred
            to a new task), or ``pretrain.max_epochs`` is not positive.
    """
    pre = cfg.pretrain
    if not pre.enabled:
        return None
    if pre.max_epochs < 1:
        raise ConfigurationError(
            f"pretrain.max_epochs must be >= 1, got {pre.max_epochs}; or set pretrain.enabled=false."
        )
    data_overrides, model_overrides = _stage_overrides(cfg, "data"), _stage_overrides(cfg, "model")
    fine = cfg.data.get("classes")
    overlap = [] if data_overrides else sorted(set(pre.classes) & set(fine if fine is not None else range(10)))
    if overlap:
        raise ConfigurationError(
            f"pretrain.classes {list(pre.classes)} and data.classes {fine} share digits {overlap}: the fine-tuning "
            "task must be new; e.g. pretrain.classes=[0,1,2,3,4] data.classes=[5,6,7,8,9], or pretrain.enabled=false."
        )
    path = cache_path(cfg)
    if path.is_file() and not pre.force:
        meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
        log.info(f"pretrained {pre.transfer}: reusing {path} ({_stage_name(cfg)}, {_metrics_text(meta)})")
        return path
    log.info(f"pretraining on {_stage_name(cfg)} for {pre.max_epochs} epochs -> {path}")
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    stage_data = data_overrides or {"classes": list(pre.classes)}
    data = instantiate(cfg.data, **{**stage_data, "batch_size": int(pre.batch_size)}, _convert_="all")
    classes = {"num_classes": len(pre.classes)} if "num_classes" in cfg.model and not data_overrides else {}
    model = instantiate(cfg.model, **{**classes, **model_overrides}, _convert_="all")
    if not any(k.startswith(f"{pre.transfer}.") for k in model.state_dict()):
        raise ConfigurationError(
            f"pretrain.transfer={pre.transfer!r} matches no parameter or buffer of {type(model).__name__}; name one of "
            f"its modules ({', '.join(sorted({k.split('.')[0] for k in model.state_dict()}))}) or set "
            "pretrain.enabled=false."
        )
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        deterministic=cfg.trainer.deterministic,
        max_epochs=int(pre.max_epochs),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.trainer.enable_progress_bar),
        default_root_dir=str(path.parent),
    )
    trainer.fit(model, datamodule=data)
    prefix = f"{pre.transfer}."
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_") and v.numel() == 1}
    val_acc = metrics.get("val_acc", float("nan"))
    meta = {"classes": [int(c) for c in pre.classes], "val_acc": val_acc, "epochs": int(pre.max_epochs)}
    meta["metrics"] = metrics
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)
    log.info(f"pretrained on {_stage_name(cfg)}: {_metrics_text(meta)}; saved {path}")
    return path


def load_pretrained(model: torch.nn.Module, path: Path, transfer: str) -> int:
    """Copy the cached ``transfer`` weights into ``model``; return how many tensors were copied.

    Raises:
        ConfigurationError: If the model's ``transfer`` tensors and the cached ones differ in names or shapes
            (the model settings changed since the cache was written: pretrain again with pretrain.force=true).
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    state = model.state_dict()
    names = getattr(model, "pretrained_names", None)  # a model whose names differ from the pretrained ones (PEFT)
    if callable(names):
        rename = {k: v for k, v in names().items() if k.startswith(f"{transfer}.")}
        saved = {rename.get(k, k): v for k, v in saved.items()}
        own = {k: state[k] for k in rename.values()}
    else:
        own = {k: v for k, v in state.items() if k.startswith(f"{transfer}.")}
    mismatched = sorted(set(own) ^ set(saved)) + sorted(k for k in own if k in saved and own[k].shape != saved[k].shape)
    if mismatched:
        raise ConfigurationError(
            f"the pretrained weights in {path} do not fit {type(model).__name__}.{transfer} ({mismatched[:3]} differ); "
            "pretrain again with pretrain.force=true."
        )
    model.load_state_dict(saved, strict=False)
    return len(saved)
