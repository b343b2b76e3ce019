"""Tensor-level tools, usable without Lightning: the mechanisms behind every callback.

Names are verbs (``freeze``, ``mask_gradients``, ``detach_if``, ...); the callbacks in
:mod:`lit_partial.callbacks` add only timing, state and logging on top of them.
"""

from __future__ import annotations

from lit_partial.functional.measure import count_flops

__all__ = ["count_flops"]
