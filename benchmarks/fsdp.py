"""Every callback under FSDP2: step time relative to plain FSDP2, and optimizer-state bytes per rank.

Two gloo processes on the CPU train ``ResidualFFN(8, 384)`` (batch 256 per rank, AdamW) through Lightning's
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, with ``fully_shard`` on every block
and then the root in ``configure_model``. Each variant is a full ``Trainer.fit`` of a few dozen steps; a
callback times every training batch (``on_train_batch_start`` to ``on_train_batch_end``, which spans
forward, backward, the callbacks' hooks and the optimizer step), the first steps are dropped as warm-up, and
variants are fitted in rotating order over several rounds, so machine noise hits them alike; the ratio of
medians is reported. After each fit every rank reports the bytes of its optimizer state (its shards of the
AdamW moments) and, for GradientMasking, of its mask shards and strict-mode snapshot buffers.

    python -m benchmarks --only fsdp [--quick]

The section re-runs this module (``python -m benchmarks.fsdp --worker``): the strategy re-launches its script
once per rank, which cannot happen inside the benchmark process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import Section

ROOT = Path(__file__).resolve().parents[1]

REQUIRES: tuple[str, ...] = ()  # optional packages, checked before any section runs

HALF = 4  # blocks.0-3: the bottom half of the 8 blocks
WARMUP = 3


def _variants() -> dict[str, Callable[[], list[Any]]]:
    from lit_partial import (
        ActivationDetach,
        ActivationMemoryMonitor,
        ConditionalDetach,
        GradientMasking,
        LayerFreezing,
        SelectiveBackprop,
        StochasticDepth,
    )

    bottom = [f"blocks.{i}" for i in range(HALF)]
    return {
        "plain FSDP2": lambda: [],
        "LayerFreezing, bottom half frozen": lambda: [LayerFreezing(frozen=bottom)],
        "GradientMasking, random 10% of every weight, strict": lambda: [
            GradientMasking({"re:.*weight": {"kind": "random", "keep": 0.1, "seed": 0}}, log_fraction=False)
        ],
        "ConditionalDetach, bottom half detached": lambda: [ConditionalDetach({f"blocks.{HALF - 1}": "always"})],
        "ConditionalDetach, per-rank statistic (reduced to one decision)": lambda: [
            ConditionalDetach({f"blocks.{HALF - 1}": {"stat": "mean", "op": ">", "value": 1e9}})
        ],
        "StochasticDepth, drop rate 0.5": lambda: [StochasticDepth(blocks="blocks.*", drop_rate=0.5)],
        "ActivationDetach, checkpoint every block": lambda: [ActivationDetach(checkpoint="blocks.*")],
        "SelectiveBackprop, topk keep 0.25": lambda: [SelectiveBackprop(keep=0.25, method="topk")],
        "ActivationMemoryMonitor": lambda: [ActivationMemoryMonitor()],
    }


def _worker(out: Path, rounds: int, steps: int) -> None:
    """Fit every variant ``rounds`` times under FSDP2 (run once per rank by the strategy's launcher)."""
    import lightning as L
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from lit_partial import GradientMasking, PartialBackpropMixin
    from lit_partial.demos.models import ResidualFFN
    from lit_partial.distributed import local_tensor

    class Net(PartialBackpropMixin, L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = ResidualFFN(num_blocks=8, width=384).blocks

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]  # type: ignore[index]
            for block in self.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self, mesh=mesh)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blocks(x)  # type: ignore[no-any-return]

        def per_sample_loss(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return F.mse_loss(self(x), y, reduction="none").mean(1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.partial_param_groups(lr=1e-4))

    class Data(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader[Any]:
            gen = torch.Generator().manual_seed(self.trainer.global_rank)
            x = torch.randn(256 * 4, 384, generator=gen)
            return DataLoader(TensorDataset(x, torch.randn(256 * 4, 384, generator=gen)), batch_size=256)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.state_bytes = self.mask_bytes = 0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.times.append(time.perf_counter() - self._start)

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            opt = trainer.optimizers[0]
            self.state_bytes = sum(
                local_tensor(v).numel() * v.element_size()
                for s in opt.state.values()
                for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0
            )
            for cb in trainer.callbacks:
                if isinstance(cb, GradientMasking):  # masks (bool shards) + strict snapshots (one per masked shard)
                    masks = [local_tensor(m) for m in cb.masks.values()]
                    params = [local_tensor(p) for _, p in pl_module.named_parameters() if "weight" in _]
                    self.mask_bytes = sum(m.numel() for m in masks) + sum(p.numel() * 4 for p in params)

    torch.set_num_threads(1)
    variants = _variants()
    names = list(variants)
    results: dict[str, dict[str, Any]] = {name: {"steps": [], "state_bytes": 0, "extra_bytes": 0} for name in names}
    rank = 0
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            torch.manual_seed(0)
            timer = StepTimer()
            trainer = L.Trainer(
                accelerator="cpu",
                devices=2,
                strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                max_steps=steps,
                callbacks=[*variants[name](), timer],
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                use_distributed_sampler=False,
                num_sanity_val_steps=0,
            )
            trainer.fit(Net(), datamodule=Data())
            rank = trainer.global_rank
            results[name]["steps"] += timer.times[WARMUP:]
            results[name]["state_bytes"] = timer.state_bytes
            results[name]["extra_bytes"] = timer.mask_bytes
    if rank == 0:
        (out / "fsdp.json").write_text(json.dumps(results))


def run(args: Any) -> Section:
    rounds, steps = (1, 8) if args.quick else (3, 20)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "benchmarks.fsdp", "--worker", tmp, "--rounds", str(rounds), "--steps", str(steps)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            return Section(title="FSDP2", rows=[], notes=[f"FSDP2 part failed: {proc.stderr[-2000:]}"])
        results = json.loads((Path(tmp) / "fsdp.json").read_text())
    base = statistics.median(results["plain FSDP2"]["steps"])
    base_bytes = results["plain FSDP2"]["state_bytes"]
    rows = []
    for name, res in results.items():
        t = statistics.median(res["steps"])
        rows.append(
            {
                "variant": name,
                "step ms": 1e3 * t,
                "vs plain FSDP2": t / base,
                "AdamW state MiB / rank": res["state_bytes"] / 2**20,
                "vs plain": res["state_bytes"] / base_bytes if base_bytes else None,
                "masks + snapshots MiB / rank": res["extra_bytes"] / 2**20 if res["extra_bytes"] else None,
            }
        )
    notes = [
        f"ResidualFFN(8 blocks, width 384), batch 256 per rank, AdamW, 2 gloo processes on the shared CPU, "
        f"{rounds} round(s) x {steps} steps per variant (first {WARMUP} dropped), median step time; ratios only.",
        "A step is Lightning's on_train_batch_start -> on_train_batch_end: forward, backward, FSDP2's all-gathers "
        "and reduce-scatters, the callbacks' hooks and the optimizer step.",
        "Optimizer state: this rank's shards of AdamW's exp_avg/exp_avg_sq (frozen parameters get none; masked "
        "elements keep theirs). GradientMasking's extra bytes: bool mask shards + strict snapshot buffers (upper "
        "bound: one per masked weight shard).",
        "Skipped and detached blocks save compute, not communication: FSDP2 all-gathers a block in its pre-forward "
        "hook before the callback decides to skip it, and a skipped block's output still carries FSDP2's "
        "pre-backward hook.",
    ]
    return Section(title="FSDP2 (ModelParallelStrategy, 2 gloo processes)", rows=rows, notes=notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    cli = parser.parse_args()
    _worker(cli.worker, cli.rounds, cli.steps)
