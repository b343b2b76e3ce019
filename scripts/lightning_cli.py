"""LightningCLI entry point: the same techniques as ``scripts/train.py``, configured the LightningCLI way.

    python scripts/lightning_cli.py fit --config configs/layer_freezing.yaml
    python scripts/lightning_cli.py fit --config configs/stochastic_depth.yaml --trainer.max_epochs=5
    python scripts/lightning_cli.py fit --config configs/gradient_masking.yaml --print_config   # the parsed config

Model and data are chosen by ``class_path`` in the YAML (any LightningModule / LightningDataModule: yours too);
lit_partial callbacks go in ``trainer.callbacks``. Every callback argument keeps the structure written in the YAML
(masks, schedules and conditions stay mappings and lists). LightningCLI needs ``jsonargparse[signatures]``
(``pip install 'lit-partial[cli]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run LightningCLI (``args``: the command line; default ``sys.argv[1:]``); returns the CLI object."""
    kwargs: dict[str, Any] = {"subclass_mode_model": True, "subclass_mode_data": True}
    return LightningCLI(L.LightningModule, L.LightningDataModule, args=args, run=run, **kwargs)


if __name__ == "__main__":
    main()
