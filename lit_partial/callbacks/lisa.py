"""``LISA``: layerwise importance-sampled AdamW: every K optimizer steps, a fresh random few of the layers train.

Pan et al., NeurIPS 2024 (arXiv 2403.17919), Algorithm 1: for each period of ``interval_steps`` optimizer steps,
freeze every layer of the stack and release ``n_active`` of them drawn at random; what is not in the stack
(embeddings, head, final norm) keeps its own ``requires_grad``. Where the reference (LMFlow's
``DynamicLayerActivationCallback``) is wrong, this callback is right:

* Layers frozen before the optimizer is built were never stepped (LMFlow #726): here nothing is frozen before the
  first training batch, so any optimizer (``partial_param_groups``, a ``requires_grad`` filter, LightningCLI's)
  holds every layer.
* LMFlow keeps the AdamW state of every layer ever drawn, so memory grows back to full fine-tuning (LMFlow #729,
  #768, #778): with ``reset_optimizer_state=True`` a layer leaving the active set gives up its state and one
  coming back starts fresh; groups and their learning rates are kept.
* Per-rank ``np.random`` draws hang sharded training when ranks disagree: draws are a function of
  ``(seed, period)`` (:func:`~lit_partial.functional.layer_sampling.sample_layers`), the same on every rank and
  after a resume, consuming no global RNG.
* Switches happen at optimizer-step boundaries, also under ``accumulate_grad_batches``; resume is exact.

Example:
    >>> cb = LISA(layers="model.layers.*", n_active=2, interval_steps=20)
    >>> cb.n_active, cb.interval_steps, cb.reset_optimizer_state
    (2, 20, True)
"""

from __future__ import annotations

from typing import Any

from torch import nn
from typing_extensions import override

from lit_partial.callbacks._units import PeriodicUnitTechnique, check_int
from lit_partial.errors import ConfigurationError
from lit_partial.functional.layer_sampling import sample_layers
from lit_partial.selectors import Selectors

__all__ = ["LISA"]


class LISA(PeriodicUnitTechnique):
    """Train ``n_active`` randomly drawn layers of a stack at a time, a new draw every ``interval_steps`` steps.

    Args:
        layers: Selectors of the layers (each matched module is one layer), e.g. ``"model.layers.*"`` for a
            Hugging Face causal LM held as ``self.model`` by a LightningModule is ``"model.model.layers.*"``.
        n_active: Layers that train in each period (LISA's gamma; LMFlow's default 2).
        interval_steps: Optimizer steps per period (LISA's K; LMFlow's default 20).
        seed: Seed of the draws; period ``p`` trains ``sample_layers(len(layers), n_active, seed, p)``.
        reset_optimizer_state: Drop the optimizer state of layers not drawn (LMFlow keeps it: False).
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`).
    """

    def __init__(
        self,
        layers: Selectors = "model.layers.*",
        n_active: int = 2,
        interval_steps: int = 20,
        seed: int = 0,
        reset_optimizer_state: bool = True,
        *,
        accept_config_change: bool = False,
    ) -> None:
        super().__init__(layers, reset_optimizer_state=reset_optimizer_state, accept_config_change=accept_config_change)
        self.n_active = check_int(n_active, "n_active", 1)
        self.interval = self.interval_steps = check_int(interval_steps, "interval_steps", 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"`seed` is {seed!r}; expected an integer.")
        self.seed = seed

    @override
    def config(self) -> dict[str, Any]:
        return {
            "layers": self.units,
            "n_active": self.n_active,
            "interval_steps": self.interval_steps,
            "seed": self.seed,
            "reset_optimizer_state": self.reset_optimizer_state,
        }

    @override
    def check_units(self, model: nn.Module) -> None:
        if self.n_active > len(self.unit_names):
            raise ConfigurationError(
                f"LISA: n_active={self.n_active} but `layers`={self.units} selects only {len(self.unit_names)} "
                f"layers ({', '.join(self.unit_names[:4])}...). Fix: lower n_active, or select more layers."
            )

    @override
    def units_for(self, period: int) -> list[int]:
        return sample_layers(len(self.unit_names), self.n_active, self.seed, period)

    @override
    def units_to_drop(self, previous: tuple[int, ...], active: list[int]) -> list[int]:
        # Every layer not drawn: those leaving give up their state, those staying keep it (Algorithm 1 with a
        # fresh state per layer activation); idempotent, so a resume at a period boundary drops the same.
        return [i for i in range(len(self.unit_names)) if i not in active]

    @override
    def run_summary(self) -> list[str]:
        if self.active is None:
            return []
        return [
            f"LISA: {self.switches} draws of {self.n_active} of {len(self.unit_names)} layers every "
            f"{self.interval_steps} steps; last: {', '.join(self.active_names())}"
        ]
