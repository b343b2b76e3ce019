"""Spectrum's SNRs and selection equal the reference formula's (``spectrum.py``) on the same random Llama."""

from __future__ import annotations

import pytest
import torch

from lit_partial import LayerFreezing
from lit_partial.functional.spectrum import module_type, spectrum_frozen, spectrum_snr, spectrum_trainable
from tests.hf._models import build  # skips the module without transformers

np = pytest.importorskip("numpy")
pytestmark = pytest.mark.hf


def reference_snr(weights: torch.Tensor) -> float:
    """``ModelModifier.calculate_snr_for_layer``'s body for one module, as the reference writes it."""
    weights = weights.detach()
    if weights.ndim < 2:
        weights = weights.unsqueeze(0)
    S = torch.linalg.svdvals(weights)
    max_singular_value = S[0]
    sigma_estimated = (torch.quantile(S, 0.75) - torch.quantile(S, 0.25)) / 1.349
    n, m = weights.shape[-2:]
    beta = n / m if n < m else m / n
    mp_threshold = sigma_estimated * np.sqrt((1 + np.sqrt(beta)) ** 2)
    signal_mask = S > mp_threshold
    noise_mask = ~signal_mask
    signal = S[signal_mask].sum() if signal_mask.any() else torch.tensor(0.0)
    noise = S[noise_mask].sum() if noise_mask.any() else torch.tensor(1.0)
    snr = signal / noise if noise != 0 else float("inf")
    return float((snr / max_singular_value).item())


def test_snr_of_every_projection_equals_the_reference() -> None:
    torch.manual_seed(0)
    model = build("llama")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 10
    for name, module in linears:
        assert spectrum_snr(module.weight) == reference_snr(module.weight), name


def test_selection_is_the_top_fraction_per_type_like_generate_unfrozen_params_yaml() -> None:
    torch.manual_seed(0)
    model = build("llama")
    chosen = spectrum_trainable(model, top_fraction=0.5)
    assert set(chosen) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # fmt: skip
    for kind, names in chosen.items():
        scored = [(n, reference_snr(m.weight)) for n, m in model.named_modules() if module_type(n) == kind]
        ranked = sorted(scored, key=lambda x: x[1], reverse=True)
        assert names == [n for n, _ in ranked[: int(len(ranked) * 50 / 100)]]
    frozen = spectrum_frozen(model, top_fraction=0.5)
    assert len(frozen) == 7 and not set(frozen) & {n for names in chosen.values() for n in names}
    LayerFreezing(frozen=frozen)  # the names are selectors LayerFreezing takes


def test_top_fraction_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"top_fraction=50; expected a fraction from 0 to 1"):
        spectrum_trainable(torch.nn.Linear(2, 2), top_fraction=50)
