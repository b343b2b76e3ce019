"""``BAdam``: block coordinate descent with Adam: one block trains for K steps, then the next, state restarting.

Luo, Yu, Li, NeurIPS 2024 (arXiv 2404.02827); reference: PyPI ``badam`` 1.4, ``BlockOptimizer``. Each module the
``blocks`` selector matches is one block (a decoder layer); one block trains at a time, for ``switch_every``
optimizer steps, in ``ascending``, ``descending``, ``random`` (a fresh permutation per pass) or ``fixed`` order,
and with ``reset_optimizer_state=True`` the optimizer state of every block restarts at every switch, as in the
paper. Unlike ``BlockOptimizer`` this is a callback around *your* optimizer, not an optimizer wrapper, and:

* **Every block gets ``switch_every`` updates.** ``BlockOptimizer`` switches after step ``K - 1`` first (its
  first block gets K-1 updates, later ones K).
* **Your parameter groups are kept**: their learning rates (``lr_scale``, LR schedulers per group) and weight
  decay. ``BlockOptimizer`` rebuilds two groups from the base optimizer's *defaults*, so every group takes
  ``param_groups[0]``'s learning rate and the default weight decay (torch AdamW's 0.01, biases and norms
  included), whatever the groups say.
* **Parameters outside the blocks keep their own** ``requires_grad`` (and their optimizer state across switches).
  ``BlockOptimizer`` freezes them; put ``LayerFreezing(frozen=[...])`` beside BAdam for that (the preset does).
* **Exact resume**: the block schedule is a function of the optimizer step (and the seed, for ``random``), saved
  with the period; ``BlockOptimizer`` saves neither its block index nor its order.
* **No global RNG**: ``random`` order draws from ``(seed, pass)``, the same on every rank; ``BlockOptimizer``
  consumes ``torch.randperm`` of the global generator.
* fp32 master copies of low-precision blocks are not kept: train in fp32 weights (or a precision plugin).

Example:
    >>> cb = BAdam(blocks="model.layers.*", switch_every=50, order="descending")
    >>> cb.order, cb.switch_every
    ('descending', 50)
"""

from __future__ import annotations

from typing import Any

from torch import nn
from typing_extensions import override

from lit_partial.callbacks._units import PeriodicUnitTechnique, check_int
from lit_partial.errors import ConfigurationError
from lit_partial.functional.layer_sampling import ORDERS, active_block
from lit_partial.selectors import Selectors

__all__ = ["BAdam"]


class BAdam(PeriodicUnitTechnique):
    """Train one block of a stack at a time, switching every ``switch_every`` optimizer steps (BAdam).

    Args:
        blocks: Selectors of the blocks (each matched module is one block), e.g. ``"model.layers.*"`` (a Hugging
            Face causal LM held as ``self.model`` by a LightningModule: ``"model.model.layers.*"``).
        switch_every: Optimizer steps per block (BAdam's K; the paper suggests ``min(max(n / (B D), 50), 100)``
            for n samples, batch size B and D blocks).
        order: ``"ascending"``, ``"descending"`` (BAdam's default), ``"random"`` or ``"fixed"``.
        start_block: The first block's index (``fixed``: the only one); default 0, or the last for ``descending``.
            Not with ``random``.
        seed: Seed of the ``random`` order.
        reset_optimizer_state: Restart every block's optimizer state at each switch (BAdam); False keeps it.
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`).
    """

    units_argument = "blocks"

    def __init__(
        self,
        blocks: Selectors = "model.layers.*",
        switch_every: int = 50,
        order: str = "descending",
        start_block: int | None = None,
        seed: int = 0,
        reset_optimizer_state: bool = True,
        *,
        accept_config_change: bool = False,
    ) -> None:
        super().__init__(blocks, reset_optimizer_state=reset_optimizer_state, accept_config_change=accept_config_change)
        self.interval = self.switch_every = check_int(switch_every, "switch_every", 1)
        if order not in ORDERS:
            raise ConfigurationError(f"`order` is {order!r}; expected one of {', '.join(ORDERS)}.")
        self.order = order
        if start_block is not None:
            check_int(start_block, "start_block", 0)
        if start_block is not None and order == "random":
            raise ConfigurationError(
                "`start_block` is given with order='random', whose blocks come from the draw. Fix: drop start_block, "
                "or use order='ascending' / 'descending' / 'fixed'."
            )
        self.start_block = start_block
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"`seed` is {seed!r}; expected an integer.")
        self.seed = seed

    @override
    def config(self) -> dict[str, Any]:
        return {
            "blocks": self.units,
            "switch_every": self.switch_every,
            "order": self.order,
            "start_block": self.start_block,
            "seed": self.seed,
            "reset_optimizer_state": self.reset_optimizer_state,
        }

    @override
    def check_units(self, model: nn.Module) -> None:
        if self.start_block is not None and self.start_block >= len(self.unit_names):
            raise ConfigurationError(
                f"BAdam: start_block={self.start_block} but `blocks`={self.units} selects {len(self.unit_names)} "
                f"blocks (indices 0..{len(self.unit_names) - 1}). Fix: pick an index in that range."
            )

    @override
    def units_for(self, period: int) -> list[int]:
        n = len(self.unit_names)
        return [active_block(period * self.switch_every, n, self.switch_every, self.order, self.start_block, self.seed)]

    @override
    def units_to_drop(self, previous: tuple[int, ...], active: list[int]) -> list[int]:
        return list(range(len(self.unit_names)))  # the paper's restart: every block, the one continuing too

    @override
    def run_summary(self) -> list[str]:
        if self.active is None:
            return []
        return [
            f"BAdam: {self.switches} block periods of {self.switch_every} steps over {len(self.unit_names)} blocks "
            f"({self.order}); last: {', '.join(self.active_names())}"
        ]
