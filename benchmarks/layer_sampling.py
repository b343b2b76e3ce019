"""LISA and BAdam on a Llama built from a config: optimizer-state bytes, backward FLOPs, step time vs by hand.

The model is Hugging Face's ``LlamaForCausalLM`` with random weights (:data:`LAYERS` decoder layers of width
:data:`WIDTH`, untied head). Every variant trains in a real ``Trainer.fit`` with AdamW over all parameters:

* full fine-tuning (the reference for the ratios);
* LISA (2 of the layers every :data:`K` steps), ours with ``reset_optimizer_state=True``, and with ``False``
  (what LMFlow does: the state of every layer ever drawn stays);
* BAdam (one layer at a time, descending, embeddings/norm/head frozen beside it as BAdam's own default);
* LISA and BAdam written by hand in the LightningModule (``on_train_batch_start``: the same draws or blocks,
  ``requires_grad`` loop, state popped from the optimizer), for the step-time ratio.

Reported per variant: the largest AdamW state in bytes over the run (after every step), backward FLOPs of one step
(``FlopCounterMode`` around ``backward`` with the variant's trainable set; deterministic), both as ratios to full
fine-tuning, and the median step time (CPU time of the training thread, batch end to batch end, rounds
interleaved) as a ratio to the hand-written schedule.

    python -m benchmarks --only layer_sampling [--quick]
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from benchmarks._common import Section, quiet
from lit_partial import LISA, BAdam, LayerFreezing
from lit_partial.functional.layer_sampling import active_block, optimizer_state_bytes, sample_layers

REQUIRES: tuple[str, ...] = ("transformers",)  # optional packages, checked before any section runs

LAYERS, WIDTH, HEADS, FFN, VOCAB = 16, 64, 4, 176, 512
BATCH, SEQ, LR = 4, 32, 1e-4
K, ACTIVE = 4, 2  # steps per LISA draw / BAdam block, LISA's active layers
OUTSIDE = ["hf.model.embed_tokens", "hf.model.norm", "hf.lm_head"]


def build_hf(seed: int = 0) -> nn.Module:
    """The benchmark's Llama (needs ``transformers``)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=LAYERS, hidden_size=WIDTH, intermediate_size=FFN, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=4 * SEQ, tie_word_embeddings=False,
        use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


class Tokens(Dataset[Tensor]):
    """Fixed random token sequences."""

    def __init__(self, n: int) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Tensor:
        return self.ids[i]


class LM(L.LightningModule):
    """A causal LM (``self.hf``) with AdamW over all parameters; ``hand`` = "lisa" / "badam" switches by hand."""

    def __init__(self, hf: nn.Module, hand: str | None = None) -> None:
        super().__init__()
        self.hf, self.hand = hf, hand
        self.layers: Any = hf.model.layers  # type: ignore[union-attr]

    @override
    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.hf(input_ids=batch, labels=batch).loss  # type: ignore[no-any-return]

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)

    @override
    def on_train_start(self) -> None:
        if self.hand == "badam":
            for name in OUTSIDE:
                self.get_submodule(name).requires_grad_(False)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = self.trainer.global_step
        if self.hand is None or step % K:
            return
        if self.hand == "lisa":
            active = set(sample_layers(LAYERS, ACTIVE, 0, step // K))
        else:
            active = {active_block(step, LAYERS, K, "descending")}
        optimizer = self.trainer.optimizers[0]
        for i, layer in enumerate(self.layers):
            for p in layer.parameters():
                p.requires_grad_(i in active)
                if i not in active or self.hand == "badam":
                    p.grad = None
                    optimizer.state.pop(p, None)


class Probe(Callback):
    """Step end times (thread CPU time), the largest optimizer state, and one step's backward FLOPs."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.state_bytes = 0
        self.backward_flops = 0

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.ends.append(time.thread_time())
        self.state_bytes = max(self.state_bytes, optimizer_state_bytes(trainer.optimizers[0]))

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = Tokens(BATCH)[:BATCH]
        loss = pl_module.training_step(batch, 0)  # the trainable set of the last period
        with FlopCounterMode(display=False) as counter:
            loss.backward()  # type: ignore[union-attr]
        self.backward_flops = int(counter.get_total_flops())
        pl_module.zero_grad(set_to_none=True)

    def median_step(self, warmup: int) -> float:
        """The median step time after ``warmup`` steps."""
        times = [b - a for a, b in zip(self.ends[warmup:], self.ends[warmup + 1 :], strict=False)]
        return statistics.median(times) if times else float("nan")


VARIANTS: dict[str, tuple[str | None, Any]] = {
    "full fine-tuning": (None, list),
    "LISA (ours)": (None, lambda: [LISA("hf.model.layers.*", ACTIVE, K)]),
    "LISA, state kept (LMFlow)": (None, lambda: [LISA("hf.model.layers.*", ACTIVE, K, reset_optimizer_state=False)]),
    "LISA by hand": ("lisa", list),
    "BAdam (ours)": (None, lambda: [LayerFreezing(frozen=OUTSIDE), BAdam("hf.model.layers.*", K)]),
    "BAdam by hand": ("badam", list),
}


def fit(hf: nn.Module, hand: str | None, callbacks: list[Callback], steps: int) -> Probe:
    probe = Probe()
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, callbacks=[*callbacks, probe], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(LM(copy.deepcopy(hf), hand), DataLoader(Tokens(BATCH * steps), batch_size=BATCH))
    return probe


def run(args: Any) -> Section:
    quiet()
    if not getattr(args, "threads", None):
        torch.set_num_threads(1)  # one thread: steadier ratios on a shared machine
    rounds, steps, warmup = (2, 2 * K + 1, 2) if args.quick else (5, 4 * K + 1, 3)
    hf = build_hf()
    per_round: dict[str, list[float]] = {name: [] for name in VARIANTS}
    probes: dict[str, Probe] = {}
    names = list(VARIANTS)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # interleaved, the order rotating
            hand, callbacks = VARIANTS[name]
            probes[name] = fit(hf, hand, callbacks(), steps)
            per_round[name].append(probes[name].median_step(warmup))
    step = {name: statistics.median(values) for name, values in per_round.items()}
    full = probes["full fine-tuning"]
    hand_of = {"LISA (ours)": "LISA by hand", "BAdam (ours)": "BAdam by hand"}
    rows = [
        {
            "variant": name,
            "optimizer state (KiB)": probe.state_bytes / 1024,
            "state / full": probe.state_bytes / full.state_bytes,
            "backward FLOPs / full": probe.backward_flops / full.backward_flops,
            "step time / by hand": step[name] / step[hand_of[name]] if name in hand_of else "",
        }
        for name, probe in probes.items()
    ]
    notes = [
        f"LlamaForCausalLM from a config: {LAYERS} layers, width {WIDTH}, vocab {VOCAB}, batch {BATCH}x{SEQ}; AdamW "
        f"over all parameters; LISA {ACTIVE} of {LAYERS} layers every {K} steps, BAdam one layer per {K} steps with "
        f"embeddings, final norm and head frozen; {steps} steps per fit, {rounds} interleaved rounds, 1 thread.",
        "Optimizer state: the largest AdamW state over the run (checked after every step). With its state kept, "
        "LISA holds the moments of every layer drawn so far (LMFlow #729); ours holds the active layers' and "
        "those outside the stack.",
        "Backward FLOPs: one step with the last period's trainable set. Frozen layers still pass gradients to the "
        "layers below them, so LISA saves only their weight-gradient products, BAdam (frozen embeddings) also "
        "everything below its block.",
    ]
    return Section(f"Layer sampling: LISA and BAdam on a {LAYERS}-layer Llama", rows, notes)
