"""Lightning callbacks: one file per technique; each holds timing, state and logging only."""

from __future__ import annotations

__all__: list[str] = []
