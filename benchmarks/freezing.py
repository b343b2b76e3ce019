"""LayerFreezing: step time, FLOPs, trainable parameters and optimizer state, side by side in one run.

Part 1, ``ResidualFFN(8, 384)`` on a batch of 256 with AdamW, the bottom 4 blocks frozen:

* plain PyTorch: ``requires_grad=False`` on the prefix, AdamW over the trainable parameters (the reference);
* LayerFreezing: frozen by the callback's ``setup``, AdamW over ``partial_param_groups`` (every parameter,
  one group per phase), and the callback's per-step hooks (``on_train_batch_start``,
  ``on_before_optimizer_step``) called around every step as Lightning would;
* Lightning ``BaseFinetuning.freeze`` with its default ``train_bn=True``;
* no freezing at all, for scale.

Each timed call is one training step (zero_grad, forward, MSE, backward, AdamW step, plus hooks); Trainer
startup is not included. Part 2 repeats the frozen-backbone comparison on the digits CNN, which has
BatchNorm: there ``train_bn=True`` keeps backward running through the whole frozen backbone.

    python -m benchmarks --only freezing [--quick]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn

from benchmarks._common import Section, ffn_setup, time_side_by_side
from lit_partial import LayerFreezing
from lit_partial.demos.models import DigitsCNN
from lit_partial.functional import count_flops, hold_norm_statistics

REQUIRES: tuple[str, ...] = ()  # optional packages, checked before any section runs

FROZEN_BLOCKS = 4


def _optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def _trainer() -> L.Trainer:
    # Only to hand the callback what its hooks read (strategy, global_step); never fitted.
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)


def _variant(name: str, make: Callable[[], tuple[nn.Module, Any, Any]], frozen: list[str]) -> dict[str, Any]:
    """Build one variant: a step function and what it holds (trainable params, optimizer, FLOPs)."""
    model, x, y = make()
    before: Callable[[], None] = lambda: None  # noqa: E731
    after: Callable[[torch.optim.Optimizer], None] = lambda opt: None  # noqa: E731
    if name == "plain PyTorch (requires_grad=False prefix)":
        for n in frozen:
            for p in model.get_submodule(n).parameters():
                p.requires_grad_(False)
            hold_norm_statistics(model.get_submodule(n))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    elif name == "LayerFreezing":
        trainer, cb = _trainer(), LayerFreezing(frozen=frozen)
        cb.setup(trainer, model, "fit")  # type: ignore[arg-type]
        cb.on_train_start(trainer, model)  # type: ignore[arg-type]
        opt = torch.optim.AdamW(cb.plan_param_groups(model, {"lr": 1e-3}))
        before = lambda: cb.on_train_batch_start(trainer, model, None, 0)  # type: ignore[arg-type]  # noqa: E731
        after = lambda o: cb.on_before_optimizer_step(trainer, model, o)  # type: ignore[arg-type]  # noqa: E731
    elif name == "Lightning BaseFinetuning (train_bn=True)":
        BaseFinetuning.freeze([model.get_submodule(n) for n in frozen], train_bn=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    if name != "Lightning BaseFinetuning (train_bn=True)":  # BaseFinetuning leaves frozen BN training
        for n in frozen:
            hold_norm_statistics(model.get_submodule(n))

    def loss() -> torch.Tensor:
        out = model(x)
        return F.cross_entropy(out, y) if y.dtype == torch.long else F.mse_loss(out, y)

    def step() -> None:
        before()
        opt.zero_grad(set_to_none=True)
        loss().backward()
        after(opt)
        opt.step()

    step()

    def hooks_only() -> None:
        before()
        after(opt)

    return {
        "step": step,
        "hooks": hooks_only,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "opt_bytes": _optimizer_state_bytes(opt),
        "flops": count_flops(lambda: loss().backward()),
    }


def _section_rows(make: Callable[[], tuple[nn.Module, Any, Any]], frozen: list[str], rounds: int, iters: int):
    names = [
        "plain PyTorch (requires_grad=False prefix)",
        "LayerFreezing",
        "Lightning BaseFinetuning (train_bn=True)",
        "no freezing",
    ]
    variants = {n: _variant(n, make, frozen) for n in names}
    steps = {n: v["step"] for n, v in variants.items()}
    times = time_side_by_side(steps, warmup=1, rounds=rounds, iters=iters, reduce="min")
    ref, full_flops = times[names[0]], variants["no freezing"]["flops"]
    hook_fn = {"hooks": variants["LayerFreezing"]["hooks"]}
    hooks = time_side_by_side(hook_fn, warmup=1, rounds=rounds, iters=200, reduce="min")["hooks"]
    rows = [
        {
            "variant": n,
            "ms/step": 1e3 * times[n],
            "vs plain": times[n] / ref,
            "FLOPs vs no freezing": v["flops"] / full_flops,
            "trainable params": v["trainable"],
            "AdamW state (MiB)": v["opt_bytes"] / 2**20,
        }
        for n, v in variants.items()
    ]
    # Wall-time ratios of whole steps are at the mercy of a shared CPU; the hooks' own cost is not.
    rows[1]["hooks alone (us/step)"] = 1e6 * hooks
    rows[1]["hooks / plain step"] = hooks / ref
    return rows


def _digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return DigitsCNN(), torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,))


def run(args: Any) -> Section:
    torch.manual_seed(0)
    rounds, iters = (4, 2) if args.quick else (30, 3)
    threads = torch.get_num_threads()
    if not getattr(args, "threads", None):
        torch.set_num_threads(1)  # one thread: far steadier ratios on a shared machine than contended threads
    ffn_frozen = [f"blocks.{i}" for i in range(FROZEN_BLOCKS)]
    rows = [{"model": "ResidualFFN 8x384", **r} for r in _section_rows(ffn_setup, ffn_frozen, rounds, iters)]
    rows += [{"model": "DigitsCNN (BN)", **r} for r in _section_rows(_digits, ["backbone"], rounds, iters)]
    torch.set_num_threads(threads)
    for row in rows:
        row.setdefault("hooks alone (us/step)", "")
        row.setdefault("hooks / plain step", "")
    return Section(
        title="LayerFreezing: bottom half frozen vs plain PyTorch and Lightning BaseFinetuning (batch 256, AdamW)",
        rows=rows,
        notes=[
            f"{getattr(args, 'threads', None) or 1} torch thread(s). "
            "Target: LayerFreezing <= 1.03x the plain requires_grad=False loop on ResidualFFN. Times are the best of "
            "interleaved rounds (order rotated) on a shared CPU: compare ratios within one run, not absolute times.",
            f"ResidualFFN: blocks.0-{FROZEN_BLOCKS - 1} frozen; FLOP ratio 1 - 2k/(3N - 1/2) = "
            f"{1 - 2 * FROZEN_BLOCKS / (3 * 8 - 0.5):.4f}: the input needs no gradient, so block 0 never computes one.",
            "ResidualFFN has no BatchNorm, so BaseFinetuning's train_bn=True changes nothing there; on DigitsCNN "
            "it keeps BN trainable inside the frozen backbone, so backward runs through every conv layer.",
            "LayerFreezing passes every parameter to AdamW (planned groups); frozen ones get no gradient, hence no "
            "optimizer state: the same bytes as the plain loop that filters them out.",
        ],
    )
