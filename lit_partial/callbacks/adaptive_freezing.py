"""``AdaptiveFreezing``: AutoFreeze's rule: freeze the front layers whose gradients have stopped changing.

Liu, Agarwal, Venkataraman, arXiv 2102.01386 (up to 2.55x faster BERT fine-tuning). Every ``every_n_steps``
optimizer steps, each layer's gradients summed over the interval give its L1 norm; the layers before the first one
whose relative change is at or above the ``percentile`` of the trainable layers' changes are frozen, front to
back, never thawed (:func:`~lit_partial.functional.adaptive_freezing.freeze_start`). The first evaluation only
records. Compared with the reference (``freeze_intermediate_e2e_lr.py``):

* Gradients are summed once per optimizer step, after accumulation and the DDP all-reduce (the reference adds the
  running ``.grad`` after every micro-batch, counting accumulated gradients several times), so every rank holds
  the same sums and freezes the same layers.
* The optimizer is kept: frozen layers give up their state (``reset_optimizer_state``), the others keep theirs
  and every group its learning rate (the reference builds a new model and optimizer).
* Frozen layers stay frozen (the reference's search from layer 0 can set its start back to 0).
* Resume is exact: the sums of the running interval, the previous norms and the first trainable layer are saved
  by parameter name.

The sums cost one gradient-sized buffer per trainable layer parameter (freed as layers freeze).

Example:
    >>> cb = AdaptiveFreezing(layers="model.layers.*", every_n_steps=100, percentile=50)
    >>> cb.every_n_steps, cb.percentile
    (100, 50.0)
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from lit_partial._compat import foreach_add_
from lit_partial.callbacks._units import UnitTechnique, check_int
from lit_partial.distributed import is_dtensor, local_tensor
from lit_partial.errors import ConfigurationError
from lit_partial.functional.adaptive_freezing import freeze_start
from lit_partial.selectors import Selectors

__all__ = ["AdaptiveFreezing"]


class AdaptiveFreezing(UnitTechnique):
    """Freeze a growing prefix of a layer stack by AutoFreeze's gradient-norm-change rule.

    Args:
        layers: Selectors of the layers, front (input side) to back in model order, e.g. ``"model.layers.*"``
            (BERT held as ``self.model``: ``"model.bert.encoder.layer.*"``).
        every_n_steps: Optimizer steps per evaluation interval.
        percentile: Percentile (0-100) of the trainable layers' gradient changes used as the threshold (50: the
            median, AutoFreeze's default).
        reset_optimizer_state: Frozen layers give up their optimizer state.
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`).
    """

    def __init__(
        self,
        layers: Selectors = "model.layers.*",
        every_n_steps: int = 100,
        percentile: float = 50.0,
        reset_optimizer_state: bool = True,
        *,
        accept_config_change: bool = False,
    ) -> None:
        super().__init__(layers, reset_optimizer_state=reset_optimizer_state, accept_config_change=accept_config_change)
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", 1)
        if isinstance(percentile, bool) or not isinstance(percentile, int | float) or not 0 <= percentile <= 100:
            raise ConfigurationError(f"`percentile` is {percentile!r}; expected a number from 0 to 100 (50: median).")
        self.percentile = float(percentile)
        self.start = 0  # the first layer still training
        self.previous: list[float] | None = None  # each layer's norm over the previous interval
        self.history: list[tuple[int, int]] = []  # (optimizer step, new first trainable layer)
        self._sums: dict[str, Tensor] = {}  # parameter name -> gradient summed over this interval
        self._accumulate: tuple[list[Tensor], list[torch.nn.Parameter]] = ([], [])
        self._evaluated_at = 0

    @override
    def config(self) -> dict[str, Any]:
        return {
            "layers": self.units,
            "every_n_steps": self.every_n_steps,
            "percentile": self.percentile,
            "reset_optimizer_state": self.reset_optimizer_state,
        }

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().attach(trainer, pl_module)
        self.start, self.previous, self.history, self._sums, self._evaluated_at = 0, None, [], {}, 0

    # ---------------------------------------------------------------- per step
    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.active is None:  # first batch (or first after a resume): the saved prefix is frozen again
            self._freeze_to(self.start, drop=False)
        if step > 0 and step % self.every_n_steps == 0 and step != self._evaluated_at:
            self._evaluate(step)

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)  # DDP: the gradients are averaged first
        sums, params = self._accumulate
        present = [(s, p.grad) for s, p in zip(sums, params, strict=True) if p.grad is not None]
        if present:
            foreach_add_([s for s, _ in present], [g for _, g in present])

    def _freeze_to(self, start: int, drop: bool) -> None:
        n = len(self.unit_names)
        self.switch(range(start, n), drop=range(self.start, start) if drop else ())
        self.start = start
        training = {name for i in range(start, n) for name, _ in self.unit_params[i]}
        self._sums = {name: s for name, s in self._sums.items() if name in training}
        pairs = [(name, p) for i in range(start, n) for name, p in self.unit_params[i] if p.requires_grad]
        for name, p in pairs:
            saved = self._sums.get(name)  # from a checkpoint: loaded on the CPU
            self._sums[name] = torch.zeros_like(p) if saved is None else saved.to(p.device)
        self._accumulate = ([self._sums[name] for name, _ in pairs], [p for _, p in pairs])

    def _evaluate(self, step: int) -> None:
        self._evaluated_at = step
        names = [name for name, _ in self._sums.items()]
        norms = self._l1_norms([self._sums[n] for n in names]) if names else []
        by_name = dict(zip(names, norms, strict=True))
        current = [sum(by_name.get(name, 0.0) for name, _ in params) for params in self.unit_params]
        for s in self._sums.values():
            s.zero_()
        if self.previous is not None:
            start = freeze_start(self.previous, current, self.start, self.percentile)
            if start > self.start:
                frozen = ", ".join(self.unit_names[self.start : start])
                self._freeze_to(start, drop=True)
                self.history.append((step, start))
                self.report(f"at step {step}: froze {frozen}; training from {self.unit_names[start]}")
        self.previous = current

    @staticmethod
    def _l1_norms(sums: list[Tensor]) -> list[float]:
        """L1 norms of ``sums`` as floats: one host sync; under FSDP2 the shards' norms add up in ONE all-reduce."""
        sharded = any(is_dtensor(s) for s in sums)
        norms = torch.stack([torch.linalg.vector_norm(local_tensor(s), 1) for s in sums])
        if sharded:
            dist.all_reduce(norms, op=dist.ReduceOp.SUM)  # every rank holds its shard's part of each norm
        return [float(v) for v in norms.tolist()]

    # ---------------------------------------------------------------- resume and report
    @override
    def technique_state(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "previous": self.previous,
            "history": [list(h) for h in self.history],
            "sums": {name: s.detach().clone() for name, s in self._sums.items()},
            "evaluated_at": self._evaluated_at,
        }

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self.start = int(state.get("start", 0))
        self.previous = state.get("previous")
        self.history = [(int(a), int(b)) for a, b in state.get("history", [])]
        self._evaluated_at = int(state.get("evaluated_at", 0))
        self._sums = {name: s.clone() for name, s in state.get("sums", {}).items()}
        self.active = None  # re-applied at the next batch, after the optimizer state is restored

    @override
    def run_summary(self) -> list[str]:
        if not self.history:
            return []
        steps = ", ".join(f"step {s}: from {self.unit_names[i]}" for s, i in self.history)
        return [f"AdaptiveFreezing froze {self.start} of {len(self.unit_names)} layers ({steps})"]
