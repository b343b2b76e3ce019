"""``DropBackward``: residual branches keep their forward but, at budgeted rates, lose their backward (DropBP).

Woo et al. (NeurIPS 2024) detach the output of each residual branch (attention, MLP) with probability ``p_i`` per
step: ``x + branch(x).detach()`` has the forward of ``x + branch(x)``, but backward skips the branch. The rates are
uniform, or allocated once from a sensitivity pass so that the FLOPs-weighted average meets the target
(:func:`~lit_partial.functional.drop_backward.allocate_drop_rates`).

Design choices:

* **Rank-agreed, resumable drop sets.** Each step's draw for a branch is a function of ``(seed, branch name,
  global step, micro-batch within the step)`` only (not of the global RNG, not of the rank), topped up by DropBP's
  rule; so every rank drops the same branches (DDP gets ``find_unused_parameters=True``, FSDP2 issues the same
  collectives on every rank) and a resumed run draws what the uninterrupted one would. Rates are checkpointed by name.
* **Branch FLOPs** are measured once, in the first (eager) forward that runs them, with ``FlopCounterMode``.
* **The sensitivity pass** (``allocation="sensitivity"``) runs at ``sensitivity_step`` on that step's batch:
  ``training_step`` with no branch dropped, then once with each branch alone dropped, gradients by
  ``torch.autograd.grad`` (``.grad`` and the optimizer are never touched), logging silenced, buffers restored,
  every RNG stream forked (and reseeded alike for each pass, so dropout masks agree). ``sensitivity_i`` is DropBP's
  ``sum over parameters (|g| - |g_i|)^2``, averaged over ranks so the allocation agrees.

Example:
    >>> cb = DropBackward("model.layers.*.self_attn,model.layers.*.mlp", rate=0.5)
    >>> cb.branches, cb.config()["allocation"]
    (['model.layers.*.self_attn', 'model.layers.*.mlp'], 'uniform')
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from lit_partial.callbacks.base import Technique
from lit_partial.conditions import uniform_draw
from lit_partial.distributed import allow_unused_parameters, gather_objects, world_size
from lit_partial.errors import ConfigurationError
from lit_partial.functional.drop_backward import (
    allocate_drop_rates,
    draw_drop_set,
    drop_branch_outputs,
    weighted_drop_rate,
)
from lit_partial.handles import Handle, Handles
from lit_partial.selectors import Selectors, as_selector_list, canonical_name, outermost, preview, select_modules

__all__ = ["DropBackward"]

ALLOCATIONS = ("uniform", "sensitivity")


def _fraction(value: Any, name: str, *, max_rate: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if max_rate and not (ok and 0.0 < value <= 1.0):
        raise ConfigurationError(f"`{name}` must be a number in (0, 1], got {value!r}.")
    if not max_rate and not (ok and 0.0 <= value < 1.0):
        raise ConfigurationError(f"`{name}` must be a number in [0, 1), got {value!r}.")


class DropBackward(Technique):
    """Drop the backward pass of selected residual branches at per-branch rates (DropBP); forwards are kept.

    Select the branch modules whose output is added to the residual stream (``model.layers.*.self_attn`` and
    ``model.layers.*.mlp`` in a Hugging Face Llama), never whole layers (their output *is* the residual stream).

    Args:
        branches: Module selectors of the residual branches (a comma-separated string, or a list).
        rate: The target average drop rate, in [0, 1).
        allocation: ``"uniform"``: every branch drops at ``rate``; ``"sensitivity"``: rates from DropBP's greedy
            rule on a one-off sensitivity pass, so the FLOPs-weighted average meets ``rate`` (uniform before it).
        seed: Seed of the per-step draws.
        sensitivity_step: The global step whose batch the sensitivity pass uses (DropBP: 10% into training).
        min_rate: Lowest per-branch rate of the sensitivity allocation.
        max_rate: A branch's rate stops rising at this (sensitivity allocation).
        top_up: DropBP's rule: when fewer than ``rate`` of the branches are drawn, drop more, highest rate first.
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`).

    Attributes:
        rates: Each branch's drop rate, by module name.
        flops: Each branch's forward FLOPs (measured in the first forward), by module name.
        sensitivities: The sensitivity pass's result, by module name (empty before it).
        drops: How many steps dropped each branch, by module name.

    Example:
        >>> DropBackward(["blocks.*.mlp"], rate=0.25, allocation="sensitivity").config()["rate"]
        0.25
    """

    def __init__(
        self,
        branches: Selectors,
        rate: float = 0.5,
        allocation: str = "uniform",
        seed: int = 0,
        *,
        sensitivity_step: int = 0,
        min_rate: float = 0.0,
        max_rate: float = 0.9,
        top_up: bool = True,
        accept_config_change: bool = False,
    ) -> None:
        super().__init__(accept_config_change=accept_config_change)
        if isinstance(branches, str):
            branches = [part.strip() for part in branches.split(",") if part.strip()]
        self.branches = as_selector_list(branches, argument="branches")
        _fraction(rate, "rate")
        if allocation not in ALLOCATIONS:
            raise ConfigurationError(f"`allocation` must be one of {ALLOCATIONS}, got {allocation!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"`seed` must be an integer, got {seed!r}.")
        if isinstance(sensitivity_step, bool) or not isinstance(sensitivity_step, int) or sensitivity_step < 0:
            raise ConfigurationError(f"`sensitivity_step` must be an integer >= 0, got {sensitivity_step!r}.")
        _fraction(min_rate, "min_rate")
        _fraction(max_rate, "max_rate", max_rate=True)
        if min_rate > rate:
            raise ConfigurationError(f"`min_rate` ({min_rate!r}) must not exceed `rate` ({rate!r}).")
        if not isinstance(top_up, bool):
            raise ConfigurationError(f"`top_up` must be True or False, got {top_up!r}.")
        self.rate, self.allocation, self.seed = float(rate), allocation, seed
        self.sensitivity_step, self.min_rate, self.max_rate, self.top_up = sensitivity_step, min_rate, max_rate, top_up
        self.rates: dict[str, float] = {}
        self.flops: dict[str, int] = {}
        self.sensitivities: dict[str, float] = {}
        self.drops: dict[str, int] = {}
        self.steps = 0
        self._names: list[str] = []
        self._dropped: frozenset[str] = frozenset()
        self._active = False
        self._measure = Handles()

    @override
    def config(self) -> dict[str, Any]:
        names = ("branches", "rate", "allocation", "seed", "sensitivity_step", "min_rate", "max_rate", "top_up")
        return {name: getattr(self, name) for name in names}

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = dict(select_modules(pl_module, self.branches))
        chosen = [(canonical_name(name), named[name]) for name in outermost(named)]
        self._names = [name for name, _ in chosen]
        for name in self._names:
            self.rates.setdefault(name, self.rate)
            self.drops.setdefault(name, 0)
        allow_unused_parameters(trainer, "DropBackward", f"the backward of {preview(self._names)} is dropped")
        self.handles.add(drop_branch_outputs(chosen, self._is_dropped))
        if not self.flops:
            self._measure = self._flop_hooks(chosen)
            self.handles.add(Handle(self._measure.remove))
        rank_zero_info(f"DropBackward: {len(chosen)} branches ({preview(self._names)}), rate={self.rate}, "
                       f"allocation={self.allocation}")  # fmt: skip

    @property
    def dropped(self) -> list[str]:
        """The branches the current (or last) training step drops, in model order."""
        return [name for name in self._names if name in self._dropped]

    def _is_dropped(self, name: str) -> bool:
        return self._active and name in self._dropped

    def _flop_hooks(self, chosen: list[tuple[str, nn.Module]]) -> Handles:
        counters: dict[str, FlopCounterMode] = {}
        handles = Handles()
        for name, module in chosen:

            def pre(mod: nn.Module, args: Any, name: str = name) -> None:
                if self._active and not torch.compiler.is_compiling():
                    counters[name] = FlopCounterMode(display=False)
                    counters[name].__enter__()  # type: ignore[no-untyped-call]  # untyped in torch

            def post(mod: nn.Module, args: Any, output: Any, name: str = name) -> None:
                counter = counters.pop(name, None)
                if counter is not None:
                    counter.__exit__(None, None, None)  # type: ignore[no-untyped-call]  # untyped in torch
                    self.flops[name] = self.flops.get(name, 0) + int(counter.get_total_flops())

            handles.add(module.register_forward_pre_hook(pre))
            handles.add(module.register_forward_hook(post))
        return handles

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.allocation == "sensitivity" and not self.sensitivities and step >= self.sensitivity_step:
            self._allocate(pl_module, batch, batch_idx)
        rates = [self.rates[name] for name in self._names]
        micro = batch_idx % max(1, int(trainer.accumulate_grad_batches))  # micro-batches of one step draw apart
        draws = [uniform_draw(self.seed, name, step, micro) for name in self._names]
        dropped = draw_drop_set(rates, draws, self.rate, top_up=self.top_up)
        self._dropped = frozenset(name for name, drop in zip(self._names, dropped, strict=True) if drop)
        for name in self._dropped:
            self.drops[name] += 1
        self.steps += 1
        self._active = True

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._active = False  # the drop set stays readable (``dropped``) until the next step
        if self.flops and len(self._measure):
            self._measure.remove()  # measured once: no hook stays to slow (or recompile) later steps
        flops = [self.flops.get(name, 1) for name in self._names]
        dropped = [1.0 if name in self._dropped else 0.0 for name in self._names]
        pl_module.log(
            "drop_backward/dropped_flops_fraction", weighted_drop_rate(dropped, flops), on_step=True, on_epoch=False,
            batch_size=1,
        )  # fmt: skip

    def _allocate(self, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        sensitivities = self._sensitivity_pass(pl_module, batch, batch_idx)
        if world_size() > 1:  # each rank scored its own batch: average, so every rank allocates alike
            gathered = gather_objects(sensitivities)
            sensitivities = [sum(column) / len(gathered) for column in zip(*gathered, strict=True)]
        missing = [name for name in self._names if name not in self.flops]
        if missing:
            rank_zero_warn(f"DropBackward: no FLOPs measured for {preview(missing)} (compiled?); counting them as 1.")
        flops = [self.flops.get(name, 1) for name in self._names]
        rates = allocate_drop_rates(
            sensitivities, flops, self.rate, min_rate=self.min_rate, max_rate=self.max_rate
        )  # fmt: skip
        self.sensitivities = dict(zip(self._names, sensitivities, strict=True))
        self.rates = dict(zip(self._names, rates, strict=True))
        rank_zero_info(
            "DropBackward: allocated rates "
            + ", ".join(f"{name}={rate:.1f}" for name, rate in self.rates.items())
            + f" (FLOPs-weighted {weighted_drop_rate(rates, flops):.3f})"
        )

    def _sensitivity_pass(self, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> list[float]:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        silenced = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
        pl_module.__dict__.update(silenced)

        def grad_norms(dropped: frozenset[str]) -> Tensor:
            self._dropped = dropped
            torch.manual_seed(self.seed)  # inside fork_rng: every pass draws the same dropout masks
            out = pl_module.training_step(batch, batch_idx)
            loss: Tensor = out["loss"] if isinstance(out, dict) else out  # type: ignore[assignment]  # a loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            zero = torch.zeros((), device=pl_module.device)
            return torch.stack([zero if g is None else g.detach().float().norm() for g in grads])

        try:
            with (
                torch.random.fork_rng(devices),
                torch.enable_grad(),
                pl_module.trainer.precision_plugin.forward_context(),
            ):
                self._active = True
                base = grad_norms(frozenset())
                scores = torch.stack([((base - grad_norms(frozenset([n]))) ** 2).sum() for n in self._names])
        finally:
            self._active, self._dropped = False, frozenset()
            for key in silenced:
                pl_module.__dict__.pop(key, None)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        return [float(s) for s in scores.tolist()]

    @override
    def cleanup(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        self._active = False

    @override
    def run_summary(self) -> list[str]:
        if not self.steps:
            return []
        flops = [self.flops.get(name, 1) for name in self._names]
        realized = [self.drops[name] / self.steps for name in self._names]
        return [
            f"DropBackward ({self.allocation}, rate={self.rate}): {len(self._names)} branches, FLOPs-weighted drop "
            f"rate {weighted_drop_rate(realized, flops):.3f} over {self.steps} steps"
        ]

    @override
    def technique_state(self) -> dict[str, Any]:
        return {
            "rates": dict(self.rates),
            "flops": dict(self.flops),
            "sensitivities": dict(self.sensitivities),
            "drops": dict(self.drops),
            "steps": self.steps,
        }

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self.rates = {str(k): float(v) for k, v in state.get("rates", {}).items()}
        self.flops = {str(k): int(v) for k, v in state.get("flops", {}).items()}
        self.sensitivities = {str(k): float(v) for k, v in state.get("sensitivities", {}).items()}
        self.drops = {str(k): int(v) for k, v in state.get("drops", {}).items()}
        self.steps = int(state.get("steps", 0))
        if self.flops:
            self._measure.remove()
