"""Token selection, dropped backward passes and selective checkpointing on a Llama built from a config (#23).

One ``LlamaForCausalLM`` (random weights, 8 layers, width 256, batch 8 x 128 tokens) trains with a plain
causal-LM step, and the same step with each technique attached through its functional mechanism:

* TokenSelection (keep 0.6): per-token losses, top-k of the valid tokens, masked mean - the overhead of scoring;
* DropBackward at rate 0.25 and 0.5 (uniform rates, DropBP's topped-up draw, the drop set of step 0 at seed 0):
  backward FLOPs (``FlopCounterMode`` over ``backward()`` alone, deterministic) and step time;
* checkpointing every decoder layer: none, the ``"matmul"`` selective policy, full. Saved bytes are
  ``live_forward_bytes`` (what the forward leaves alive, the selective cache included): deterministic.

Times are medians of interleaved rounds (``time_side_by_side``); only ratios measured in one run mean something.
"""

from __future__ import annotations

import statistics
from argparse import Namespace
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks._common import Section, time_side_by_side
from lit_partial.conditions import uniform_draw
from lit_partial.functional import (
    checkpoint_modules,
    draw_drop_set,
    drop_branch_outputs,
    live_forward_bytes,
    masked_token_mean,
    select_tokens,
    token_losses,
)

REQUIRES = ("transformers", "matplotlib")

SIZE = {"layers": 8, "width": 256, "heads": 4, "ffn": 688, "vocab": 256, "batch": 8, "seq": 128}
KEEP = 0.6
RATES = (0.25, 0.5)


def build(size: dict[str, int], seed: int = 0) -> tuple[nn.Module, Tensor]:
    """The benchmark's Llama (no cache) and a batch of token ids."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        num_hidden_layers=size["layers"], hidden_size=size["width"], intermediate_size=size["ffn"],
        num_attention_heads=size["heads"], num_key_value_heads=size["heads"], vocab_size=size["vocab"],
        max_position_embeddings=size["seq"], use_cache=False, tie_word_embeddings=False,
    )  # fmt: skip
    ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(seed))
    return transformers.LlamaForCausalLM(config).train(), ids


def branches(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The residual branches DropBP wraps: every layer's ``self_attn`` and ``mlp``."""
    layers = model.get_submodule("model.layers")
    return [
        (f"model.layers.{i}.{k}", getattr(layer, k)) for i, layer in enumerate(layers) for k in ("self_attn", "mlp")
    ]


def loss_fn(model: nn.Module, ids: Tensor, keep: float | None = None) -> Tensor:
    losses, valid = token_losses(model(input_ids=ids).logits, ids)
    if keep is None:
        return masked_token_mean(losses, valid)
    return masked_token_mean(losses, select_tokens(losses.detach(), valid, keep))


def drop_set(names: list[str], rate: float, step: int = 0, seed: int = 0) -> set[str]:
    """The drop set DropBackward draws at ``step`` (uniform rates)."""
    draws = [uniform_draw(seed, name, step, 0) for name in names]
    return {n for n, d in zip(names, draw_drop_set([rate] * len(names), draws, rate), strict=True) if d}


def backward_flops(model: nn.Module, ids: Tensor, keep: float | None = None) -> int:
    loss = loss_fn(model, ids, keep)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def measure(size: dict[str, int], rounds: int = 5, iters: int = 3) -> dict[str, Any]:
    """Every variant's deterministic counters and (interleaved) step times."""
    model, ids = build(size)
    names = [n for n, _ in branches(model)]
    state: dict[str, Any] = {"dropped": set()}
    drop_handles = drop_branch_outputs(branches(model), lambda name: name in state["dropped"])
    variants: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {}  # name -> (set up, tear down)
    variants["plain step"] = (lambda: None, lambda: None)
    variants[f"TokenSelection(keep={KEEP})"] = (lambda: None, lambda: None)
    drops = {rate: drop_set(names, rate) for rate in RATES}
    for rate in RATES:
        variants[f"DropBackward(rate={rate})"] = (
            lambda rate=rate: state.__setitem__("dropped", drops[rate]),  # type: ignore[misc]
            lambda: state.__setitem__("dropped", set()),
        )
    ckpt: dict[str, Any] = {}
    for label, policy in (("checkpoint matmul policy", "matmul"), ("checkpoint full", None)):
        variants[label] = (
            lambda label=label, policy=policy: ckpt.__setitem__(  # type: ignore[misc]
                label, checkpoint_modules(model, "model.layers.*", policy=policy)
            ),
            lambda label=label: ckpt.pop(label).remove(),  # type: ignore[misc]
        )
    counters: dict[str, dict[str, float]] = {}
    for name, (up, down) in variants.items():
        up()
        keep = KEEP if name.startswith("TokenSelection") else None
        counters[name] = {
            "backward GFLOPs": backward_flops(model, ids, keep) / 1e9,
            "saved MiB": live_forward_bytes(lambda keep=keep: loss_fn(model, ids, keep), exclude=[model, ids]) / 2**20,
        }
        down()

    def step(name: str) -> Callable[[], None]:
        up, down = variants[name]
        keep = KEEP if name.startswith("TokenSelection") else None

        def run() -> None:
            up()
            loss_fn(model, ids, keep).backward()
            model.zero_grad(set_to_none=True)
            down()

        return run

    per_round = [
        time_side_by_side({n: step(n) for n in variants}, warmup=1 if r == 0 else 0, rounds=1, iters=iters)
        for r in range(rounds)
    ]
    drop_handles.remove()
    plain = "plain step"
    for name in variants:
        counters[name]["ms / step"] = statistics.median(t[name] for t in per_round) * 1e3
        counters[name]["time / plain"] = statistics.median(t[name] / t[plain] for t in per_round)
        counters[name]["backward FLOPs / plain"] = (
            counters[name]["backward GFLOPs"] / counters[plain]["backward GFLOPs"]
        )
    return {"counters": counters, "drops": {rate: sorted(d) for rate, d in drops.items()}, "branches": len(names)}


def run(args: Namespace) -> Section:
    """Measure side by side and plot saved bytes against step time for the three checkpointing points."""
    rounds, iters = (2, 1) if args.quick else (7, 3)
    result = measure(SIZE, rounds=rounds, iters=iters)
    counters = result["counters"]
    rows = [{"variant": name, **values} for name, values in counters.items()]
    notes = [
        f"LlamaForCausalLM {SIZE['layers']} layers x width {SIZE['width']}, batch {SIZE['batch']} x {SIZE['seq']} "
        f"tokens, {torch.get_num_threads()} CPU threads; times: medians of {rounds} interleaved rounds (ratios only)",
        "DropBackward drop sets (step 0, seed 0, DropBP's top-up): "
        + "; ".join(f"rate {rate}: {len(d)} of {result['branches']} branches" for rate, d in result["drops"].items()),
        "TokenSelection changes no FLOPs (a loss mask): its cost is the sort over B x T scores",
        "saved bytes: what the forward leaves alive (live_forward_bytes, parameters and input excluded), including "
        "what selective checkpointing caches (saved_tensors_hooks do not see that cache)",
    ]
    plots = _plot(counters, args) if getattr(args, "out", None) is not None else []
    title = "LLM backward: token selection, DropBP, selective checkpointing (Llama from a config)"
    return Section(title, rows, notes, plots)


def _plot(counters: dict[str, dict[str, float]], args: Namespace) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = ["plain step", "checkpoint matmul policy", "checkpoint full"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in points:
        c = counters[name]
        ax.scatter(c["saved MiB"], c["time / plain"], s=60)
        ax.annotate(name.replace("plain step", "no checkpointing"), (c["saved MiB"], c["time / plain"]),
                    textcoords="offset points", xytext=(6, 6))  # fmt: skip
    ax.set_xlabel("activation memory after forward (MiB)")
    ax.set_ylabel("step time / no checkpointing")
    ax.set_title("Checkpointing every Llama layer: memory vs time")
    fig.tight_layout()
    name = "llm_checkpointing.png"
    fig.savefig(args.out / name, dpi=120)
    plt.close(fig)
    return [name]
