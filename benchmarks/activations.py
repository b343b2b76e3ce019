"""Activation memory: saved bytes and step time of detaching, checkpointing and offloading (ResidualFFN 8x384).

Every variant trains the same ``ResidualFFN(8, 384)`` on a batch of 256 (MSE loss, SGD step). Saved bytes are
the distinct storages the graph holds for backward when backward starts (``saved_activation_bytes``,
parameters excluded): a deterministic count. Step times are medians of interleaved rounds; only their
ratios mean something on a shared machine.
"""

from __future__ import annotations

import copy
import statistics
from argparse import Namespace
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from benchmarks._common import Section, ffn_setup, time_side_by_side
from lit_partial.functional import checkpoint_modules, detach_outputs, offload_modules, saved_activation_bytes

REQUIRES = ("matplotlib",)  # optional packages, checked before any section runs

MIDDLE = 3  # detach after blocks.3: blocks 0-3 keep nothing, blocks 4-7 train


def _variants(model: nn.Module) -> dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """Each variant: its own copy of the model and its forward. Mechanisms are those ActivationDetach attaches."""
    out: dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] = {}
    full = copy.deepcopy(model)
    out["full backprop"] = (full, full)
    hand = copy.deepcopy(model)
    out["hand-written .detach()"] = (hand, lambda x: hand.blocks[MIDDLE + 1 :](hand.blocks[: MIDDLE + 1](x).detach()))
    by_hand = copy.deepcopy(model)
    out["torch checkpoint by hand, every block"] = (by_hand, lambda x: _checkpoint_each(by_hand.blocks, x))
    for name, attach in [
        (f"ActivationDetach(at=blocks.{MIDDLE})", lambda m: detach_outputs(m, f"blocks.{MIDDLE}", when=_always)),
        ("checkpoint every block", lambda m: checkpoint_modules(m, "blocks.*", enabled=_on)),
        ("checkpoint sqrt(N) segments", lambda m: checkpoint_modules(m, "blocks", segments="sqrt", enabled=_on)),
        ("offload every block (GPU)", lambda m: offload_modules(m, "blocks.*", enabled=_on)),
    ]:
        if "offload" in name and not torch.cuda.is_available():
            continue
        copy_ = copy.deepcopy(model)
        attach(copy_)
        out[name] = (copy_, copy_)
    order = [0, 1, 3, 2, 4, 5, 6]  # each reference next to the variant it is compared with
    items = list(out.items())
    return dict(items[i] for i in order if i < len(items))


def _checkpoint_each(blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The reference for ``checkpoint every block``: what one would write in ``forward`` without lit_partial."""
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False)
    return x


def _always(name: str, output: Any) -> bool:  # the callback asks its condition on every call; so do we
    return True


def _on() -> bool:
    return True


def run(args: Namespace) -> Section:
    """Measure every variant side by side and draw ``activations.png``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, x, y = ffn_setup(num_blocks=8, width=384, batch=256, device=device)
    variants = _variants(model)
    saved = {
        name: saved_activation_bytes(lambda m=m, f=f: F.mse_loss(f(x), y), exclude=m)
        for name, (m, f) in variants.items()
    }

    def step_fn(m: nn.Module, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)

        def step() -> None:
            F.mse_loss(f(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    fns = {name: step_fn(m, f) for name, (m, f) in variants.items()}
    rounds, iters = (3, 3) if args.quick else (15, 8)
    # Ratios are taken within each interleaved round, then the median over rounds: load that drifts between
    # rounds (a shared machine) cancels out of the ratios.
    per_round = [time_side_by_side(fns, warmup=2 if r == 0 else 0, rounds=1, iters=iters) for r in range(rounds)]
    hand, by_hand = "hand-written .detach()", "torch checkpoint by hand, every block"

    def ratio(name: str, ref: str) -> float:
        return statistics.median(t[name] / t[ref] for t in per_round)

    full_b = saved["full backprop"]
    rows = [
        {
            "variant": name,
            "saved MiB": saved[name] / 2**20,
            "saved bytes": saved[name],
            "bytes / full": saved[name] / full_b,
            "ms / step": statistics.median(t[name] for t in per_round) * 1e3,
            "time / full": ratio(name, "full backprop"),
            "time / hand-written ref": ratio(name, hand)
            if "detach" in name.lower()
            else ratio(name, by_hand)
            if name.startswith("checkpoint every")
            else None,
        }
        for name in variants
    ]
    ours = f"ActivationDetach(at=blocks.{MIDDLE})"
    notes = [
        f"detach bytes equal hand-written: {saved[ours] == saved[hand]} ({saved[ours]} vs {saved[hand]}); "
        f"time ratio to hand-written {ratio(ours, hand):.3f} (target <= 1.03)",
        f"checkpoint every block: {ratio('checkpoint every block', 'full backprop'):.3f}x the time of full backprop "
        f"(target <= 1.4; recomputing every forward is 4/3 in theory), {ratio('checkpoint every block', by_hand):.3f}x "
        "torch.utils.checkpoint written by hand; sqrt(N) segments keep round(sqrt(8)) = 3 segment inputs",
        f"{device}, {torch.get_num_threads()} threads, batch 256; ratios are medians over {rounds} interleaved "
        f"rounds of {iters} steps each (forward, backward, SGD step); shared machine: compare ratios only",
    ]
    if device == "cpu":
        notes.append("offload (save_on_cpu) is skipped on CPU: the tensors would stay in the same memory")
    plots = _plot(rows, args) if getattr(args, "out", None) is not None else []
    return Section("Activation memory: detach, checkpoint, offload (ResidualFFN 8x384)", rows, notes, plots)


def _plot(rows: list[dict[str, Any]], args: Namespace) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["variant"] for row in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.barh(names, [row["saved MiB"] for row in rows], color="tab:blue")
    left.set_xlabel("saved for backward (MiB)")
    right.barh(names, [row["time / full"] for row in rows], color="tab:orange")
    right.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("step time / full backprop")
    right.set_yticklabels([])
    for ax in (left, right):
        ax.invert_yaxis()
    fig.suptitle("ResidualFFN(8 blocks, width 384), batch 256")
    fig.tight_layout()
    name = "activations.png"
    fig.savefig(args.out / name, dpi=110)
    plt.close(fig)
    return [name]
