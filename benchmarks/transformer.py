"""Transformers: every technique on a deep decoder-only Llama, side by side with the hand-written equivalent.

The model is Hugging Face's ``LlamaForCausalLM`` built from a config with random weights: :data:`LAYERS` decoder
layers of width :data:`WIDTH`, deep and narrow on purpose. It has about as many parameter tensors as the largest
dense checkpoints (Llama-2-70B has 723), so setup costs and per-layer or per-tensor hook costs show, and one step
still runs well under a second on one CPU thread. The last :data:`NEW_TOKENS` rows of the embedding and of the
(untied) output layer stand for tokens just added with ``resize_token_embeddings``.

Every variant trains in a real ``Trainer.fit`` with AdamW. Each technique runs twice: through the lit_partial
callback, and written by hand in the LightningModule the way one would without lit_partial (``requires_grad``
loop, forward hook, wrapped ``forward``, Hugging Face's ``activation_checkpointing_enable``, selection inside
``training_step``). Reported per technique:

* setup: seconds the callback's ``setup`` + ``on_fit_start`` took (target < 1 s);
* step time, ours / hand-written (target <= 1.03): per round, each variant's median step (batch end to batch
  end, so data transfer, every hook, backward and the optimizer step count) after warm-up steps; rounds
  interleave the variants, pairs side by side, and the ratio is the median of the per-round ratios;
* FLOPs per training step (``FlopCounterMode`` around a fit: forward, backward and any scoring pass) and saved
  activation bytes when backward starts (``ActivationMemoryMonitor``), both deterministic, for both versions;
* optimizer-state bytes after training (AdamW's moments: frozen or detached parameters hold none).

    python -m benchmarks --only transformer [--quick]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from benchmarks._common import Section, quiet
from lit_partial import (
    ActivationDetach,
    ActivationMemoryMonitor,
    ConditionalDetach,
    ConditionalSkip,
    GradientMasking,
    LayerFreezing,
    PartialBackpropMixin,
    SelectiveBackprop,
)
from lit_partial.conditions import uniform_draw
from lit_partial.functional.mask_builders import build_random_mask

REQUIRES = ("transformers",)  # optional packages, checked before any section runs

LAYERS, WIDTH, HEADS, KV_HEADS, FFN = 112, 64, 4, 2, 176
BIG_LAYERS = 336  # setup time only (no training): 3,027 parameter tensors
VOCAB, NEW_TOKENS = 4096, 16
BATCH, SEQ = 8, 32
LR = 1e-4
HALF = LAYERS // 2
DROP = 0.2  # layer drop probability
KEEP_SPARSE = 0.1  # fraction of each projection weight that may change
KEEP_SAMPLES = 0.25  # selective backprop
LAYER = "hf.model.layers"
EMBEDDINGS = ("hf.model.embed_tokens.weight", "hf.lm_head.weight")  # untied: the new tokens' rows in both
NEW_ROWS = list(range(-NEW_TOKENS, 0))
PROJECTIONS = rf"re:{LAYER}\..*_proj\.weight"


def build_hf(seed: int = 0, layers: int = LAYERS) -> nn.Module:
    """The benchmark's ``LlamaForCausalLM`` with random weights (needs ``transformers``)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=layers, hidden_size=WIDTH, intermediate_size=FFN, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=4 * SEQ, tie_word_embeddings=False,
        use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


class Tokens(Dataset[dict[str, Tensor]]):
    """Fixed random sequences over the whole vocabulary (new tokens included)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i]}


def sparse_masks(hf_model: nn.Module) -> dict[str, Tensor]:
    """The random masks of the sparse-subset technique, keyed by the LightningModule's parameter names."""
    return {
        f"hf.{n}": build_random_mask(p.shape, KEEP_SPARSE, seed=0, name=f"hf.{n}")
        for n, p in hf_model.named_parameters()
        if n.startswith("model.layers.") and n.endswith("_proj.weight")
    }


class LM(PartialBackpropMixin, L.LightningModule):
    """A causal LM around a Hugging Face model; ``hand`` names a technique written by hand in this module."""

    def __init__(self, hf: nn.Module, hand: str | None = None) -> None:
        super().__init__()
        self.hf, self.hand = hf, hand
        self._undo: list[Callable[[], None]] = []
        self._masks: list[tuple[Tensor, Tensor]] = []
        self._snaps: list[Tensor] = []
        self._batch_idx = 0

    @override
    def per_sample_loss(self, batch: dict[str, Tensor]) -> Tensor:
        ids = batch["input_ids"]
        logits = self.hf(input_ids=ids, use_cache=False).logits[:, :-1]
        losses = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
        return losses.view(len(ids), -1).mean(1)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        self._batch_idx = batch_idx
        if self.hand == "selective backprop":  # score without gradient in eval mode, train on the top quarter
            with torch.no_grad():
                self.eval()
                losses = self.per_sample_loss(batch)
                self.train()
            index = losses.topk(round(KEEP_SAMPLES * len(losses))).indices
            batch = {k: v[index] for k, v in batch.items()}
        return self.per_sample_loss(batch).mean()

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hand is None:
            return torch.optim.AdamW(self.partial_param_groups(lr=LR))
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)

    # ------------------------------------------------------------------ the hand-written techniques
    @override
    def setup(self, stage: str) -> None:  # before configure_optimizers, as a callback's setup
        layers = self.hf.model.layers
        half = len(layers) // 2
        if self.hand == "freeze bottom half":
            for module in [self.hf.model.embed_tokens, *layers[:half]]:
                module.requires_grad_(False)
            self._undo.append(lambda: self.requires_grad_(True))
        elif self.hand == "detach bottom half":
            handle = layers[half - 1].register_forward_hook(lambda m, i, out: out.detach())
            self._undo.append(handle.remove)
        elif self.hand == "layer drop":
            for i, layer in enumerate(layers):
                self._wrap_drop(layer, f"{LAYER}.{i}")
        elif self.hand == "checkpoint every layer":
            self.hf.activation_checkpointing_enable({"use_reentrant": False})
            self._undo.append(self.hf.activation_checkpointing_disable)
        elif self.hand in ("mask new-token rows", "mask sparse subset"):
            params = dict(self.named_parameters())
            if self.hand == "mask new-token rows":
                new_rows = torch.arange(VOCAB).unsqueeze(1) >= VOCAB - NEW_TOKENS
                self._masks = [(params[n], new_rows) for n in EMBEDDINGS]
            else:
                self._masks = [(params[n], m) for n, m in sparse_masks(self.hf).items()]
            self._snaps = [torch.empty_like(p) for p, _ in self._masks]

    def _wrap_drop(self, layer: nn.Module, name: str) -> None:
        # The same draws as ConditionalSkip({"...": {"probability": DROP}}): a replay, so both run the same layers.
        forward = layer.forward

        def maybe_skip(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if self.training and uniform_draw(0, name, self.trainer.global_step, self._batch_idx) < DROP:
                return hidden_states
            return forward(hidden_states, *args, **kwargs)  # type: ignore[no-any-return]

        layer.forward = maybe_skip
        self._undo.append(lambda: delattr(layer, "forward"))

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.hand == "mask new-token rows":  # old rows: no gradient
            for p, _ in self._masks:
                p.grad[: VOCAB - NEW_TOKENS].zero_()
        elif self.hand == "mask sparse subset":
            for p, m in self._masks:
                p.grad.mul_(m)

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Masked values must not move under AdamW (moments, weight decay): keep them across the step.
        for (p, _), buf in zip(self._masks, self._snaps, strict=True):
            buf.copy_(p.detach())
        super().optimizer_step(*args, **kwargs)
        with torch.no_grad():
            if self.hand == "mask new-token rows":
                for (p, _), buf in zip(self._masks, self._snaps, strict=True):
                    p[: VOCAB - NEW_TOKENS] = buf[: VOCAB - NEW_TOKENS]
            else:
                for (p, m), buf in zip(self._masks, self._snaps, strict=True):
                    torch.where(m, p, buf, out=p)

    @override
    def teardown(self, stage: str) -> None:
        while self._undo:
            self._undo.pop()()


def techniques(layers: int = LAYERS) -> dict[str, Callable[[], list[Callback]]]:
    """Each technique's callbacks (a new list per call) for a model of ``layers`` layers."""
    half = layers // 2
    return {
        "no technique": list,
        "freeze bottom half": lambda: [
            LayerFreezing(frozen=["hf.model.embed_tokens", *(f"{LAYER}.{i}" for i in range(half))])
        ],
        "mask new-token rows": lambda: [
            GradientMasking({name: {"kind": "rows", "index": NEW_ROWS} for name in EMBEDDINGS}, log_fraction=False)
        ],
        "mask sparse subset": lambda: [
            GradientMasking({PROJECTIONS: {"kind": "random", "keep": KEEP_SPARSE, "seed": 0}}, log_fraction=False)
        ],
        "detach bottom half": lambda: [ConditionalDetach({f"{LAYER}.{half - 1}": "always"}, log=False)],
        "layer drop": lambda: [ConditionalSkip({f"{LAYER}.*": {"probability": DROP}}, log=False)],
        "checkpoint every layer": lambda: [ActivationDetach(checkpoint=f"{LAYER}.*")],
        "selective backprop": lambda: [SelectiveBackprop(keep=KEEP_SAMPLES, method="topk")],
    }


TECHNIQUES = techniques()


def setup_seconds(layers: int) -> tuple[int, dict[str, float]]:
    """Parameter tensors of a ``layers``-layer model and each technique's ``setup`` time on it (no training)."""
    model = LM(build_hf(layers=layers))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    seconds = {}
    for name, make in techniques(layers).items():
        callbacks = make()
        start = time.perf_counter()
        for cb in callbacks:
            cb.setup(trainer, model, "fit")
        seconds[name] = time.perf_counter() - start
        for cb in callbacks:
            cb.teardown(trainer, model, "fit")
    return sum(1 for _ in model.parameters()), seconds


class StepClock(Callback):
    """Batch-end timestamps (one per training step) and the seconds the techniques' setup took."""

    def __init__(self, techniques: list[Callback]) -> None:
        self.ends: list[float] = []
        self.setup_s = 0.0
        for cb in techniques:  # time the hooks that do a technique's one-off work, as Lightning calls them
            for hook in ("setup", "on_fit_start"):
                setattr(cb, hook, self._timed(getattr(cb, hook)))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.setup_s += time.perf_counter() - start

        return run

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        # CPU time of this thread (with one torch thread, all the work runs on it): unlike wall time, it does not
        # count the moments other processes on a shared machine hold the core.
        self.ends.append(time.thread_time())

    def step_times(self, warmup: int) -> list[float]:
        """Seconds of each step after the first ``warmup`` ones."""
        return [b - a for a, b in zip(self.ends[warmup:], self.ends[warmup + 1 :], strict=False)]


def fit(model: LM, callbacks: list[Callback], steps: int) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader(Tokens(BATCH * steps), batch_size=BATCH))
    return trainer


class Variant:
    """One technique in one version: its LightningModule (kept across fits) and its callbacks (new per fit)."""

    def __init__(self, technique: str, ours: bool, hf: nn.Module) -> None:
        self.technique, self.ours = technique, ours
        self.make = techniques(len(hf.model.layers))[technique]
        self.model = LM(hf, hand=None if ours or technique == "no technique" else technique)
        self.setup_s: list[float] = []

    def fit(self, steps: int, extra: list[Callback] | None = None) -> tuple[L.Trainer, StepClock]:
        """Train ``steps`` steps with this variant's techniques (fresh callbacks) and ``extra`` callbacks."""
        callbacks = self.make() if self.ours else []
        clock = StepClock(callbacks)
        trainer = fit(self.model, [*callbacks, clock, *(extra or [])], steps)
        if callbacks:
            self.setup_s.append(clock.setup_s)
        return trainer, clock


def measure(variant: Variant, steps: int) -> dict[str, float]:
    """Deterministic counters: FLOPs per step, saved activation bytes, AdamW state bytes.

    FLOPs and bytes come from separate fits: ``FlopCounterMode``'s module tracking holds on to outputs, which
    would keep graphs alive that a detach frees.
    """
    with FlopCounterMode(display=False) as counter:
        variant.fit(steps)
    monitor = ActivationMemoryMonitor()
    trainer, _ = variant.fit(steps, [monitor])
    state = trainer.optimizers[0].state
    return {
        "flops": counter.get_total_flops() / steps,
        "saved": statistics.mean(monitor.history),
        "opt_bytes": sum(
            t.numel() * t.element_size() for s in state.values() for t in s.values() if torch.is_tensor(t)
        ),
    }


def _pairs(variants: dict[tuple[str, bool], Variant], rounds: int) -> Iterator[list[Variant]]:
    """Per round, every (hand-written, ours) pair side by side; pair order rotates, and which goes first alternates."""
    techniques = list(TECHNIQUES)
    for r in range(rounds):
        order = techniques[r % len(techniques) :] + techniques[: r % len(techniques)]
        batch = []
        for t in order:
            pair = [variants[(t, False)]] + ([variants[(t, True)]] if (t, True) in variants else [])
            batch += pair[::-1] if r % 2 else pair
        yield batch


def run(args: Any) -> Section:
    quiet()
    threads = torch.get_num_threads()
    if not getattr(args, "threads", None):
        torch.set_num_threads(1)  # one thread: far steadier ratios on a shared machine
    rounds, warmup, timed = (2, 2, 3) if args.quick else (6, 2, 5)
    used_threads = torch.get_num_threads()
    hf = build_hf()
    variants: dict[tuple[str, bool], Variant] = {}
    for t in TECHNIQUES:
        for ours in (False, True) if t != "no technique" else (False,):
            variants[(t, ours)] = Variant(t, ours, _copy(hf))
    counters = {key: measure(v, steps=4 if key[0] == "layer drop" else 2) for key, v in variants.items()}
    per_round: list[dict[tuple[str, bool], float]] = []
    for batch in _pairs(variants, rounds):
        times = {}
        for v in batch:
            _, clock = v.fit(warmup + timed + 1)
            times[(v.technique, v.ours)] = min(clock.step_times(warmup))  # the least disturbed step of the fit
        per_round.append(times)
    big_tensors, big_setup = setup_seconds(BIG_LAYERS)
    torch.set_num_threads(threads)

    def ratio(a: tuple[str, bool], b: tuple[str, bool]) -> float:
        return statistics.median(t[a] / t[b] for t in per_round)

    def spread(a: tuple[str, bool], b: tuple[str, bool]) -> str:
        ratios = sorted(t[a] / t[b] for t in per_round)
        return f"{ratios[0]:.2f}-{ratios[-1]:.2f}"

    full = ("no technique", False)
    rows = []
    for t in TECHNIQUES:
        hand, ours = (t, False), (t, True)
        mine = ours if ours in variants else hand
        rows.append(
            {
                "technique": t,
                "setup s (ours)": statistics.median(variants[ours].setup_s) if ours in variants else "-",
                f"setup s, {big_tensors:,} tensors": big_setup[t] if ours in variants else "-",
                "step ours / hand": ratio(ours, hand) if ours in variants else "-",
                "per-round range": spread(ours, hand) if ours in variants else "-",
                "hand step / no technique": ratio(hand, full),
                "FLOPs / no technique": counters[mine]["flops"] / counters[full]["flops"],
                "FLOPs ours = hand": counters[mine]["flops"] == counters[hand]["flops"],
                "saved MiB ours": counters[mine]["saved"] / 2**20,
                "saved MiB hand": counters[hand]["saved"] / 2**20,
                "AdamW state MiB ours": counters[mine]["opt_bytes"] / 2**20,
                "AdamW state MiB hand": counters[hand]["opt_bytes"] / 2**20,
            }
        )
    ms = 1e3 * statistics.median(r[full] for r in per_round)
    n_tensors = sum(1 for _ in hf.parameters())
    notes = [
        f"LlamaForCausalLM from a config with random weights: {LAYERS} layers, width {WIDTH}, {HEADS} heads "
        f"({KV_HEADS} key/value), FFN {FFN}, vocabulary {VOCAB} (untied output layer); {n_tensors:,} parameter "
        f"tensors, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f} M parameters. Batch {BATCH} x {SEQ} tokens, "
        f"AdamW lr {LR}, {used_threads} CPU thread(s); a step without any technique took {ms:.0f} ms of CPU time.",
        f"Techniques: freeze embeddings + layers 0-{HALF - 1}; masks: only the last {NEW_TOKENS} rows of the "
        f"embedding and output layer may change (strict), or a random {KEEP_SPARSE:.0%} of every projection weight "
        f"({len(sparse_masks(hf))} tensors, strict); detach the output of layer {HALF - 1}; skip each layer with "
        f"probability {DROP} (the hand-written version replays the callback's draws, so both run the same layers); "
        "checkpoint every layer (hand-written: Hugging Face's activation_checkpointing_enable, use_reentrant=False); "
        f"selective backprop: topk, keep {KEEP_SAMPLES} of each batch.",
        f"Step times are CPU time of the training thread (one torch thread: other processes' share of the core does "
        f"not count). {rounds} interleaved rounds, each a fit of {warmup + timed + 1} steps per variant, pairs side "
        f"by side; per fit the fastest of the {timed} steps after {warmup} warm-up steps; the ratio is the median "
        "over rounds of the per-round ratio, its range shown beside it. On this shared 2-core machine the ratio of "
        "two identical variants still varies by about +-5% from round to round.",
        f"Setup: the callbacks' setup + on_fit_start inside each fit (median over fits); the next column times setup "
        f"alone on the same Llama with {BIG_LAYERS} layers ({big_tensors:,} parameter tensors), built but not trained. "
        "Target < 1 s.",
        "FLOPs per step include the scoring forward of selective backprop and the recomputed forward of checkpointing "
        "(FlopCounterMode counts matrix products and attention only). 'saved MiB' is what autograd holds for backward "
        "when it starts (parameters excluded); 'AdamW state MiB' counts the moments after the fit.",
        "Hand-written masking copies each masked parameter before the step and selects the kept values back after it "
        "(rows: slice assignment); it feeds AdamW exact zeros, whose sqrt is slow on CPUs (see the masking section), "
        "where the callback keeps masked second moments at a tiny floor: that is why ours can be faster.",
    ]
    return Section(f"Transformer: every technique on a {LAYERS}-layer Llama vs hand-written", rows, notes)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
