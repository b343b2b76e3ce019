"""LightningCLI entry point: the same techniques as the Hydra main job, configured the LightningCLI way.

    cd examples/lightning_cli
    python train.py fit --config layer_freezing.yaml
    python train.py fit --config stochastic_depth.yaml --trainer.max_epochs=5
    python train.py fit --config gradient_masking.yaml --print_config      # the parsed config

Model and data are chosen by ``class_path`` in the YAML (any LightningModule / LightningDataModule: yours too);
lit_partial callbacks go in ``trainer.callbacks``. Every callback argument keeps the structure written in the YAML
(masks, schedules and conditions stay mappings and lists). LightningCLI needs ``jsonargparse[signatures]``
(``pip install 'lit-partial[cli]'``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run LightningCLI (``args``: the command line; default ``sys.argv[1:]``); returns the CLI object."""
    kwargs: dict[str, Any] = {"subclass_mode_model": True, "subclass_mode_data": True}
    return LightningCLI(L.LightningModule, L.LightningDataModule, args=args, run=run, **kwargs)


if __name__ == "__main__":
    main()
