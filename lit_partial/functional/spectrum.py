"""Spectrum's static selection: train the weight matrices with the highest signal-to-noise ratio, per module type.

Hartford et al., arXiv 2406.06623; reference: cognitivecomputations/spectrum ``spectrum.py``
(``ModelModifier.calculate_snr_for_layer``, ``generate_unfrozen_params_yaml``). For a weight ``W`` with singular
values ``S`` (descending): ``sigma = IQR(S) / 1.349``; the Marchenko-Pastur bound ``sigma (1 + sqrt(beta))`` with
``beta = min(n, m) / max(n, m)``; ``SNR = sum(S > bound) / sum(S <= bound)`` (0 without signal values, 1 for the
noise sum without noise values, as the reference), divided by ``S[0]``. The same torch operations in the same
order, so the values equal the reference's. Within each module type (``self_attn.q_proj``, ``mlp.down_proj``, ...:
the part of the name after the layer index) the top ``int(count * top_fraction)`` modules are kept.

Example:
    >>> import torch
    >>> spectrum_snr(torch.eye(4) * 3)  # no spread: all four 3s are signal, the empty noise sum counts 1: 12 / 1 / 3
    4.0
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

__all__ = ["module_type", "spectrum_frozen", "spectrum_snr", "spectrum_trainable"]

_INDEX = re.compile(r"\d+")


def spectrum_snr(weight: Tensor) -> float:
    """Spectrum's signal-to-noise ratio of one weight matrix (1-D weights are taken as one row)."""
    w = weight.detach().float()
    if w.ndim < 2:
        w = w.unsqueeze(0)
    s = torch.linalg.svdvals(w)
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    n, m = w.shape[-2:]
    beta = n / m if n < m else m / n
    bound = sigma * math.sqrt((1 + math.sqrt(beta)) ** 2)
    signal_mask = s > bound
    noise_mask = ~signal_mask
    signal = s[signal_mask].sum() if signal_mask.any() else torch.tensor(0.0)
    noise = s[noise_mask].sum() if noise_mask.any() else torch.tensor(1.0)
    snr = signal / noise if noise != 0 else torch.tensor(float("inf"))
    return float((snr / s[0]).item())


def module_type(name: str) -> str:
    """The module type Spectrum groups by: the name after its first numeric component (else the whole name).

    Example:
        >>> module_type("model.layers.3.self_attn.q_proj"), module_type("lm_head")
        ('self_attn.q_proj', 'lm_head')
    """
    parts = name.split(".")
    index = next((i for i, part in enumerate(parts) if _INDEX.fullmatch(part)), -1)
    return ".".join(parts[index + 1 :]) if index != -1 else name


def spectrum_trainable(
    model: nn.Module, top_fraction: float = 0.5, types: list[str] | None = None
) -> dict[str, list[str]]:
    """Per module type, the names of the modules to train (highest SNR first), as Spectrum selects them.

    Args:
        model: The model whose ``named_modules()`` are scanned.
        top_fraction: The fraction of each type's modules kept (``int(count * top_fraction)``, as the reference).
        types: The module types to scan; default every type of the modules inside numbered layers that hold a
            2-D ``weight`` (the linear projections).

    Raises:
        ValueError: If ``top_fraction`` is outside [0, 1].
    """
    if not 0 <= top_fraction <= 1:
        raise ValueError(f"top_fraction={top_fraction!r}; expected a fraction from 0 to 1 (0.5 keeps half).")
    weighted = [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), Tensor)]
    if types is None:
        types = sorted({module_type(n) for n, m in weighted if module_type(n) != n and m.weight.ndim == 2})
    chosen: dict[str, list[str]] = {}
    for kind in types:
        scored = [(n, spectrum_snr(m.weight)) for n, m in weighted if module_type(n) == kind]
        ranked = sorted(scored, key=lambda item: item[1], reverse=True)
        chosen[kind] = [n for n, _ in ranked[: int(len(ranked) * top_fraction)]]
    return chosen


def spectrum_frozen(model: nn.Module, top_fraction: float = 0.5, types: list[str] | None = None) -> list[str]:
    """Names of the scanned modules Spectrum does not keep: ``LayerFreezing(frozen=spectrum_frozen(model))``.

    Everything outside the scanned types (embeddings, head, norms) keeps training, as the reference keeps
    ``lm_head`` and ``embed_tokens`` trainable.
    """
    kept = {n for names in spectrum_trainable(model, top_fraction, types).values() for n in names}
    scanned = set(types) if types is not None else None
    return [
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), Tensor)
        and n not in kept
        and (module_type(n) in scanned if scanned is not None else module_type(n) != n and m.weight.ndim == 2)
    ]
