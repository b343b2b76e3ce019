"""The former name of :mod:`lit_partial.handles` (handles, forward wrappers, gates, batch transforms).

Every name stays importable from here; new code imports from :mod:`lit_partial.handles`.
"""

from __future__ import annotations

from lit_partial.handles import (
    APPLIES_BATCH_TRANSFORMS,
    BatchTransform,
    ForwardWrapper,
    GateFn,
    Handle,
    Handles,
    Removable,
    batch_transforms,
    gate_functions,
    record_gate,
    register_batch_transform,
    register_gate,
    watch_gates,
    wrap_forward,
)

__all__ = [
    "APPLIES_BATCH_TRANSFORMS",
    "BatchTransform",
    "ForwardWrapper",
    "GateFn",
    "Handle",
    "Handles",
    "Removable",
    "batch_transforms",
    "gate_functions",
    "record_gate",
    "register_batch_transform",
    "register_gate",
    "watch_gates",
    "wrap_forward",
]
