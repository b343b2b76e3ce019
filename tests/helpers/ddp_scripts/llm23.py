"""DropBackward and TokenSelection(scope="global") on 2 CPU processes (ddp_spawn), for test_llm23_ddp.py.

Run as a module from the repository root::

    python -m tests.helpers.ddp_scripts.llm23 OUT_DIR

Every rank writes ``drops{r}.json`` (DropBackward's drop set per step), ``rank{r}.pt`` (its parameters after the
DropBackward run) and ``lm{r}.pt`` (its parameters after one TokenSelection step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lit_partial import DropBackward, TokenSelection
from tests.callbacks.test_drop_backward import BRANCHES, Net, data
from tests.callbacks.test_token_selection import LM, batches
from tests.helpers.trainers import SaveParamsPerRank, quiet_trainer


class WriteDrops(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.sets: list[list[str]] = []

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        cb = next(c for c in trainer.callbacks if isinstance(c, DropBackward))  # type: ignore[attr-defined]
        self.sets.append(cb.dropped)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (self.out / f"drops{trainer.global_rank}.json").write_text(json.dumps(self.sets))


class SaveLM(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, self.out / f"lm{trainer.global_rank}.pt")


def samples() -> list[dict[str, torch.Tensor]]:
    """The per-sample items of ``batches(2)`` (6 samples): rank r gets samples r, r + 2, r + 4."""
    return [{k: v[i] for k, v in b.items()} for b in batches(2) for i in range(3)]


def main(out: Path) -> None:
    torch.manual_seed(0)
    callbacks = [DropBackward(BRANCHES, rate=0.5, seed=1), WriteDrops(out), SaveParamsPerRank(out)]
    quiet_trainer(strategy="ddp_spawn", devices=2, max_steps=3, callbacks=callbacks).fit(Net(), data())
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(samples(), batch_size=3)
    selection = TokenSelection(keep=0.3, scope="global")
    quiet_trainer(strategy="ddp_spawn", devices=2, max_steps=1, callbacks=[selection, SaveLM(out)]).fit(LM(), loader)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
