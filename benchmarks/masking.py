"""GradientMasking: step-time overhead and the masking kernels' bandwidth on the 8-block FFN.

Part 1 times one training step (SGD momentum, AdamW) of ``ResidualFFN(8, 384)`` on a batch of 256 with a random
mask (keep 10%) on every weight: no masking, gradient masking only (``strict=False``) and strict masking
(gradient masking + step hooks that keep masked elements bit-identical), each also with the gradients masked in
the backward (``mask_in_backward=True``), interleaved in one run, timed by thread CPU time.
Part 2 times the kernels on the same 16 weights against a plain tensor copy and reports achieved
bandwidth (bytes read + written per second) as a fraction of the copy's, with the alternatives tried
(``torch.where``, ``masked_fill_``, int32 masks, restoring only the masked elements by index).

    python -m benchmarks --only masking [--quick]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from benchmarks._common import Section, ffn_setup, quiet, time_side_by_side
from lit_partial import GradientMasking
from lit_partial.functional.mask_builders import build_random_mask
from lit_partial.functional.masking import (
    floor_second_moments,
    guard_masked_elements,
    kernel_mask,
    mask_gradients,
    restore_masked,
    snapshot_masked,
)

REQUIRES: tuple[str, ...] = ()  # optional packages, checked before any section runs

KEEP = 0.1
IN_BACKWARD = ", in the backward (mask_in_backward=True)"
WIDE = "int32 masks"


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, weight_decay=0.01),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01),
}


class _NoStep(torch.optim.Optimizer):
    """An optimizer whose step does nothing: times the strict hooks alone."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:
        return None


def _trainer() -> L.Trainer:
    # Only to hand the callback what its hooks read (optimizers, logging cadence, precision); never fitted.
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)


def _train_step(variant: str, optimizer: str, device: str) -> Callable[[], None]:
    """One training step with the real ``GradientMasking`` hooks called where Lightning calls them.

    ``variant``: "none"; "grads only (strict=False)" and "strict" (the callback), either with ``IN_BACKWARD``
    (post-accumulate-grad hooks instead of one pass at the step); "strict, no second-moment floor" (the functional
    kernels alone); "alt: ..." the functional kernels with the other mask form than the callback's (gradients only:
    int32 masks instead of the bool; strict: the bool instead of the callback's int32 masks on CPU).
    """
    model, x, y = ffn_setup(device=device)
    weights = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    masks = {n: build_random_mask(p.shape, KEEP, seed=0, name=n).to(device) for n, p in weights}
    opt = OPTIMIZERS[optimizer](model.parameters())
    before: Callable[[], None] = lambda: None  # noqa: E731
    if variant.startswith(("grads only", "strict")) and "no second-moment floor" not in variant:
        cb = GradientMasking(
            dict(masks),
            strict=variant.startswith("strict"),
            log_fraction=False,
            mask_in_backward=variant.endswith(IN_BACKWARD),
        )
        trainer = _trainer()
        cb.setup(trainer, model, "fit")  # type: ignore[arg-type]
        trainer.strategy.optimizers = [opt]
        cb.on_fit_start(trainer, model)  # type: ignore[arg-type]
        before = lambda: cb.on_before_optimizer_step(trainer, model, opt)  # type: ignore[arg-type]  # noqa: E731
    elif variant != "none":
        params, bools = [p for _, p in weights], [masks[n] for n, _ in weights]
        if WIDE in variant:
            bools = [kernel_mask(m, p, wide=True) for m, p in zip(bools, params, strict=True)]
        if variant.startswith("alt: strict") or "no second-moment floor" in variant:
            guard_masked_elements(opt, lambda: list(zip(params, bools, strict=True)))
        before = lambda: mask_gradients(params, bools)  # noqa: E731

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        before()
        opt.step()

    return step


def _adamw_on_zeros(device: str) -> dict[str, Callable[[], Any]]:
    """AdamW.step alone: dense gradients vs the same gradients with 90% exact zeros, with and without the floor."""
    fns = {}
    for label, zero, floor in (
        ("dense grads", False, False),
        ("90% zero grads", True, False),
        ("90% zero grads + floor_second_moments", True, True),
    ):
        model, _, _ = ffn_setup(device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        pairs = []
        for n, p in model.named_parameters():
            p.grad = torch.randn_like(p) * 1e-3
            if zero and n.endswith("weight"):
                keep = build_random_mask(p.shape, KEEP, seed=0, name=n).to(device)
                p.grad[~keep] = 0.0
                pairs.append((p, keep))
        if floor:
            floor_second_moments(opt, lambda pairs=pairs: pairs)
        fns[f"AdamW.step alone: {label}"] = opt.step
    return fns


def _kernels(device: str) -> tuple[dict[str, Callable[[], Any]], dict[str, int]]:
    model, _, _ = ffn_setup(device=device)
    weights = [(n, p.detach()) for n, p in model.named_parameters() if n.endswith("weight")]
    ps = [p.clone() for _, p in weights]
    grads = [torch.randn_like(p) for p in ps]
    masks = [build_random_mask(p.shape, KEEP, seed=0, name=n).to(device) for n, p in weights]
    wide = [kernel_mask(m, p, wide=True) for m, p in zip(masks, ps, strict=True)]
    frozen = [~m for m in masks]
    dst = [torch.empty_like(p) for p in ps]
    zero = torch.zeros((), device=device)
    holders = [torch.nn.Parameter(g, requires_grad=False) for g in grads]
    for h, g in zip(holders, grads, strict=True):
        h.grad = g
    snaps = snapshot_masked(ps, masks)
    where = [f.flatten().nonzero().flatten() for f in frozen]  # int64 indices of the masked elements
    values = [p.flatten()[i].clone() for p, i in zip(ps, where, strict=True)]
    own = [p.clone() for p in ps]  # the guard's own parameters: the other kernels write ps (a new snapshot each time)
    noop = _NoStep(own)
    strict_masks = wide if device == "cpu" else masks  # what the callback hands its guard
    guard_masked_elements(noop, lambda: list(zip(own, strict_masks, strict=True)))
    n = sum(p.numel() for p in ps)
    size, wsize = ps[0].element_size(), wide[0].element_size()
    fns: dict[str, Callable[[], Any]] = {
        "plain copy (reference)": lambda: torch._foreach_copy_(dst, ps),
        "mask_gradients (bit-select, bool mask as int8)": lambda: mask_gradients(holders, masks),
        "alt: mask_gradients, mask as wide as the parameter": lambda: mask_gradients(holders, wide),
        "snapshot_masked (into reused buffers)": lambda: snapshot_masked(ps, masks, out=snaps),
        "restore_masked (bool mask as int8)": lambda: restore_masked(ps, masks, snaps),
        "alt: restore_masked, mask as wide as the parameter": lambda: restore_masked(ps, wide, snaps),
        RESTORE: noop.step,
        "alt: torch.where(m, g, 0, out=g)": lambda: [
            torch.where(m, g, zero, out=g) for g, m in zip(grads, masks, strict=True)
        ],
        "alt: g.masked_fill_(~m, 0)": lambda: [g.masked_fill_(f, 0.0) for g, f in zip(grads, frozen, strict=True)],
        "alt: torch.where restore": lambda: [
            torch.where(m, p, s, out=p) for p, m, s in zip(ps, masks, snaps, strict=True)
        ],
        "alt: restore only the masked elements (index_copy_ from a compact snapshot)": lambda: [
            p.view(-1).index_copy_(0, i, v) for p, i, v in zip(ps, where, values, strict=True)
        ],
    }
    # Bytes each kernel must read + write at minimum (a bool mask is 1 byte per element, a wide one wsize).
    moved = {
        "plain copy (reference)": n * 2 * size,
        "mask_gradients (bit-select, bool mask as int8)": n * (2 * size + 1),
        "alt: mask_gradients, mask as wide as the parameter": n * (2 * size + wsize),
        "snapshot_masked (into reused buffers)": n * (2 * size + 1),
        "restore_masked (bool mask as int8)": n * (3 * size + 1),
        "alt: restore_masked, mask as wide as the parameter": n * (3 * size + wsize),
        RESTORE: n * (3 * size + strict_masks[0].element_size()),
        "alt: torch.where(m, g, 0, out=g)": n * (2 * size + 1),
        "alt: g.masked_fill_(~m, 0)": n * (2 * size + 1),
        "alt: torch.where restore": n * (3 * size + 1),
        "alt: restore only the masked elements (index_copy_ from a compact snapshot)": sum(i.numel() for i in where)
        * (8 + 2 * size),
    }
    return fns, moved


def _rounds(steps: dict[Any, Callable[[], None]], *, rounds: int, iters: int, cpu_time: bool) -> list[dict[Any, float]]:
    """Seconds per step of every variant, per round; each round runs all variants back to back, order rotating.

    On CPU each step is timed by this thread's CPU time (``time.thread_time``), not the wall clock: on a machine
    shared with other jobs, time spent descheduled is the noise that dominated wall-clock ratios (what remains
    is contention for caches and memory bandwidth). On GPU: wall time between synchronizations.
    """
    names = list(steps)
    for fn in steps.values():
        for _ in range(2):
            fn()
    clock = time.thread_time if cpu_time else time.perf_counter
    out = []
    for r in range(rounds):
        times = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = clock()
            for _ in range(iters):
                steps[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[name] = (clock() - start) / iters
        out.append(times)
    return out


def _spread(ratios: list[float]) -> str:
    """The middle half of the per-round ratios (quartiles), as step-time overheads."""
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return f"{100 * (q[0] - 1):+.1f}% .. {100 * (q[2] - 1):+.1f}%"


RESTORE = "strict hooks as the callback runs them (static mask: restore only)"
TARGETS = {"strict": "<= +8%", "grads only (strict=False)": "<= +3%"}


def run(args: Any) -> Section:
    quiet()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rounds, iters = (5, 1) if args.quick else (61, 1)
    variants = ("none", "grads only (strict=False)", "grads only" + IN_BACKWARD, "strict", "strict" + IN_BACKWARD)
    steps = {(o, v): _train_step(v, o, device) for o in OPTIMIZERS for v in variants}
    before = "strict, no second-moment floor (kernels alone)"
    steps[("AdamW", before)] = _train_step(before, "AdamW", device)
    for alt in (f"alt: grads only, {WIDE} (kernel_mask(wide=True))", "alt: strict, bool masks read as int8"):
        steps[("SGD momentum", alt)] = _train_step(alt, "SGD momentum", device)  # no floor: same as the callback
    # Per-round ratios, then their median: each round runs every variant back to back (order rotating), so load
    # that drifts between rounds cancels out of the ratio; a variant's best round alone could come from a quiet
    # moment its reference never saw.
    per_round = _rounds(steps, rounds=rounds, iters=iters, cpu_time=device == "cpu")
    rows: list[dict[str, Any]] = []
    for opt, variant in steps:
        ratios = [t[(opt, variant)] / t[(opt, "none")] for t in per_round]
        rows.append(
            {
                "measurement": f"{opt} train step: {variant}",
                "ms": 1e3 * min(t[(opt, variant)] for t in per_round),
                "vs reference": "reference" if variant == "none" else f"{100 * (statistics.median(ratios) - 1):+.1f}%",
                "middle half of rounds": "" if variant == "none" else _spread(ratios),
                "target": TARGETS.get(variant, ""),
            }
        )
    adam = time_side_by_side(_adamw_on_zeros(device), warmup=2, rounds=rounds, iters=iters, reduce="min")
    dense = adam["AdamW.step alone: dense grads"]
    rows += [
        {
            "measurement": name,
            "ms": 1e3 * t,
            "vs reference": "reference" if t == dense else f"{100 * (t / dense - 1):+.1f}% step time",
            "middle half of rounds": "",
            "target": "",
        }
        for name, t in adam.items()
    ]
    fns, moved = _kernels(device)
    ktimes = time_side_by_side(fns, warmup=3, rounds=7 if args.quick else 21, iters=10, reduce="min")
    copy_bw = moved["plain copy (reference)"] / ktimes["plain copy (reference)"]
    for name, t in ktimes.items():
        bw = moved[name] / t
        rows.append(
            {
                "measurement": f"kernel: {name}",
                "ms": 1e3 * t,
                "vs reference": f"{bw / 1e9:.1f} GB/s = {100 * bw / copy_bw:.0f}% of copy",
                "middle half of rounds": "",
                "target": ">= 70% of copy" if name.startswith("mask_gradients") else "",
            }
        )
    base = min(t[("SGD momentum", "none")] for t in per_round)
    select = "mask_gradients (bit-select, bool mask as int8)"
    strict_select = "alt: mask_gradients, mask as wide as the parameter" if device == "cpu" else select
    own = {
        "grads only": (ktimes[select], moved[select]),
        "strict": (ktimes[strict_select] + ktimes[RESTORE], moved[strict_select] + moved[RESTORE]),
    }
    for variant, (t, nbytes) in own.items():
        rows.append(
            {
                "measurement": f"masking's own work per step: {variant}",
                "ms": 1e3 * t,
                "vs reference": f"+{100 * t / base:.1f}% of the SGD-momentum step",
                "middle half of rounds": f"roofline: {nbytes / 2**20:.1f} MiB at copy bandwidth = "
                f"+{100 * nbytes / copy_bw / base:.1f}%",
                "target": "",
            }
        )
    numel = sum(p.numel() for n, p in ffn_setup()[0].named_parameters() if n.endswith("weight"))
    return Section(
        title="GradientMasking: overhead and kernel bandwidth (ResidualFFN 8x384, batch 256, SGD momentum / AdamW)",
        rows=rows,
        notes=[
            f"device {device}; random masks keep={KEEP} on all 16 weights ({numel:,} elements); step = zero_grad, "
            "forward, MSE, backward, [on_before_optimizer_step], optimizer step [+ strict pre/post hooks].",
            "Default (no suffix): one pass over the gradients in on_before_optimizer_step. 'in the backward': static "
            "masks applied by post-accumulate-grad hooks as each gradient is final, still in cache; the step masks "
            "only gradients written since.",
            "Kernels view tensors as same-width ints and multiply by a 0/1 integer mask: exact bits (NaN/inf -> "
            "+0.0, -0.0 kept), one pass. Masks: the bool viewed as int8 (gradients only), or on CPU in strict mode "
            "an int32 mask (kernel_mask(wide=True): a same-dtype multiply vectorizes, 4x the mask bytes). "
            "Bandwidth counts the minimum bytes.",
            f"Strict memory: one snapshot buffer per masked weight, reused every step ({4 * numel / 2**20:.1f} MiB "
            f"here), plus strict's int32 masks on CPU ({4 * numel / 2**20:.1f} MiB); bool masks "
            f"{numel / 2**20:.1f} MiB.",
            "AdamW rows include AdamW's own extra cost on zero gradients (the 'AdamW.step alone' rows, no masking "
            "code), removed by floor_second_moments; the SGD-momentum rows isolate the masking cost.",
            "'Own work' rows time the kernels alone on cold tensors; 'roofline' is the same bytes at the measured "
            "copy bandwidth, as a share of the unmasked SGD-momentum step.",
            f"{torch.get_num_threads()} CPU thread(s). Train steps: {rounds} rounds of {iters} step(s) per variant, "
            "variants back to back in each round (order rotating), timed by thread CPU time on CPU (wall time "
            "between syncs on GPU); 'vs reference' is the median over rounds of the per-round ratio to the unmasked "
            "step (middle half of the rounds beside it), 'ms' each variant's best round. Other rows: wall time, "
            "each variant's best of interleaved rounds. Shared CPU: read the ratios.",
        ],
    )
