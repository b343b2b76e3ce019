"""Counting what ``torch.compile`` does to a training run: graphs compiled, graph breaks, decision patterns.

Torch has no public API that counts compiled graphs or graph breaks; ``torch._dynamo.utils.counters`` is what
torch's own tests read (``counters["stats"]["unique_graphs"]``: graphs handed to the backend, recompilations
included; ``counters["graph_break"]``: graph breaks met while tracing, by reason). Everything that touches it is
here, and ``tests/test_compile.py::test_dynamo_counters_still_count_graphs`` fails naming the torch version if an
upgrade renames them.

Run as a script to print the table of the README's torch.compile section::

    python -m tests.helpers.compile     # every scenario, the three ways of compiling (from the repository root)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lit_partial import (
    ActivationDetach,
    ActivationMemoryMonitor,
    ConditionalDetach,
    ConditionalSkip,
    GradientMasking,
    LayerFreezing,
    SelectiveBackprop,
    StochasticDepth,
)
from lit_partial.callbacks._rules import DynamicGraphCallback
from tests.helpers.models import TinyNet, tiny_loader
from tests.helpers.trainers import quiet_trainer

BACKEND = "aot_eager"  # AOTAutograd without a code generator: fast, needs no C compiler, same graphs as inductor
HOW = ("model.compile()", "torch.compile(model)", "submodule")


@dataclass
class Counts:
    """What Dynamo did during one run."""

    graphs: int = 0
    breaks: int = 0
    reasons: list[str] = field(default_factory=list)


@contextlib.contextmanager
def dynamo_counts() -> Iterator[Counts]:
    """Count graphs and graph breaks of what runs inside (Dynamo's caches are reset first)."""
    from torch._dynamo.utils import counters  # private: see the module docstring

    torch._dynamo.reset()
    counters.clear()
    result = Counts()
    try:
        yield result
    finally:
        result.graphs = int(counters["stats"]["unique_graphs"])
        result.breaks = int(sum(counters["graph_break"].values()))
        result.reasons = [reason.splitlines()[0] for reason in counters["graph_break"]]
        torch._dynamo.reset()


class ScoredTinyNet(TinyNet):
    """TinyNet with the per-sample loss SelectiveBackprop needs."""

    @override
    def per_sample_loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y, reduction="none").mean(1)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.per_sample_loss(batch).mean()


class RecordPatterns(Callback):
    """Per training step, the decisions of every ConditionalDetach/Skip target (put it after them)."""

    def __init__(self) -> None:
        self.patterns: list[tuple[Any, ...]] = []

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        pattern: list[Any] = []
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, DynamicGraphCallback):
                for name, target in sorted(cb._step_targets.items()):
                    d = target.decision
                    pattern.append((name, d if isinstance(d, bool | str) else "rows"))
        self.patterns.append(tuple(pattern))

    @property
    def distinct(self) -> int:
        """How many different patterns the run had."""
        return len(set(self.patterns))


#: name -> (callbacks factory, model factory). The model is TinyNet (stem, blocks.0-2, gate "features", head).
SCENARIOS: dict[str, tuple[Callable[[], list[Callback]], Callable[[], L.LightningModule]]] = {
    "no callback": (lambda: [], TinyNet),
    "LayerFreezing, unfreeze at step 4": (
        lambda: [LayerFreezing(frozen="stem", schedule=[{"step": 4, "unfreeze": "stem"}])],
        TinyNet,
    ),
    "GradientMasking, rows": (lambda: [GradientMasking({"head.weight": {"kind": "rows", "index": [0]}})], TinyNet),
    "ConditionalDetach, steps [2, 5)": (lambda: [ConditionalDetach({"stem": {"steps": [2, 5]}})], TinyNet),
    "ConditionalDetach, gate, probability 0.5": (
        lambda: [ConditionalDetach({"features": {"probability": 0.5}})],
        TinyNet,
    ),
    "ConditionalDetach, per-sample probability": (
        lambda: [ConditionalDetach({"stem": {"when": {"probability": 0.5}, "per_sample": True}})],
        TinyNet,
    ),
    "ConditionalDetach, grad_scale 0.5 every 2nd step": (
        lambda: [ConditionalDetach({"blocks.0": {"when": {"every_n_steps": 2}, "grad_scale": 0.5}})],
        TinyNet,
    ),
    "ConditionalDetach, per-sample statistic": (
        lambda: [ConditionalDetach({"stem": {"when": {"stat": "mean", "op": ">", "value": 0.0}, "per_sample": True}})],
        TinyNet,
    ),
    "ConditionalDetach, whole-batch statistic": (
        lambda: [ConditionalDetach({"stem": {"stat": "mean", "op": ">", "value": 0.0}})],
        TinyNet,
    ),
    "ConditionalSkip, 3 blocks, probability 0.3": (
        lambda: [ConditionalSkip({"blocks.*": {"probability": 0.3}})],
        TinyNet,
    ),
    "StochasticDepth, 3 blocks, drop_rate 0.5": (lambda: [StochasticDepth("blocks.*", 0.5)], TinyNet),
    "StochasticDepth, per_sample": (lambda: [StochasticDepth("blocks.*", 0.5, per_sample=True)], TinyNet),
    "ActivationDetach, at + checkpoint": (lambda: [ActivationDetach(at="stem", checkpoint="blocks.1")], TinyNet),
    "ActivationMemoryMonitor": (lambda: [ActivationMemoryMonitor()], TinyNet),
    "SelectiveBackprop, topk 0.5": (lambda: [SelectiveBackprop(keep=0.5, method="topk")], ScoredTinyNet),
}


def prepare(model: L.LightningModule, how: str | None) -> Any:
    """``model`` compiled the way ``how`` says (None: not compiled); returns what to pass to ``fit``."""
    if how == "model.compile()":
        model.compile(backend=BACKEND)
        return model
    if how == "torch.compile(model)":
        return torch.compile(model, backend=BACKEND)
    if how == "submodule":
        model.blocks = torch.compile(model.blocks, backend=BACKEND)  # type: ignore[assignment]
        return model
    return model


def run(scenario: str, how: str | None, steps: int = 8, **trainer_kwargs: Any) -> tuple[Any, Counts, RecordPatterns]:
    """Train the scenario for ``steps`` steps; returns the model (uncompiled), the counts and the patterns."""
    make_callbacks, make_model = SCENARIOS[scenario]
    torch.manual_seed(0)
    model = make_model()
    fitted = prepare(model, how)
    patterns = RecordPatterns()
    with warnings.catch_warnings(), dynamo_counts() as counts:
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(max_steps=steps, callbacks=[*make_callbacks(), patterns], **trainer_kwargs)
        trainer.fit(fitted, tiny_loader())
    return model, counts, patterns


def main() -> None:
    """Print one table row per scenario: graphs (graph breaks) per way of compiling, and the decision patterns."""
    torch.set_num_threads(1)
    print(f"| scenario (8 steps) | patterns | {' | '.join(HOW)} |")
    print(f"|---|---|{'---|' * len(HOW)}")
    for scenario in SCENARIOS:
        cells, distinct = [], 0
        for how in HOW:
            _, counts, patterns = run(scenario, how)
            distinct = patterns.distinct
            cells.append(f"{counts.graphs} ({counts.breaks})")
        print(f"| {scenario} | {distinct} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
