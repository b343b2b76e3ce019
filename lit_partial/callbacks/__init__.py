"""Lightning callbacks: one file per technique; each holds timing, state and logging only."""

from __future__ import annotations

from lit_partial.callbacks.activation_detach import ActivationDetach
from lit_partial.callbacks.activation_memory import ActivationMemoryMonitor
from lit_partial.callbacks.adaptive_freezing import AdaptiveFreezing
from lit_partial.callbacks.badam import BAdam
from lit_partial.callbacks.base import Technique
from lit_partial.callbacks.conditional_detach import ConditionalDetach
from lit_partial.callbacks.conditional_skip import ConditionalSkip, StochasticDepth
from lit_partial.callbacks.cost_monitor import CostMonitor
from lit_partial.callbacks.drop_backward import DropBackward
from lit_partial.callbacks.gradient_masking import GradientMasking
from lit_partial.callbacks.layer_freezing import LayerFreezing
from lit_partial.callbacks.lisa import LISA
from lit_partial.callbacks.selective_backprop import SelectiveBackprop
from lit_partial.callbacks.token_selection import TokenSelection

__all__: list[str] = [
    "LISA",
    "ActivationDetach",
    "ActivationMemoryMonitor",
    "AdaptiveFreezing",
    "BAdam",
    "ConditionalDetach",
    "ConditionalSkip",
    "CostMonitor",
    "DropBackward",
    "GradientMasking",
    "LayerFreezing",
    "SelectiveBackprop",
    "StochasticDepth",
    "Technique",
    "TokenSelection",
]
