"""The transformer benchmark's counters on a 4-layer Llama: each callback equals its hand-written version.

Deterministic counters only (FLOPs per step, bytes saved for backward, AdamW state bytes), measured in real
``Trainer.fit`` runs exactly as ``python -m benchmarks --only transformer`` measures them.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from benchmarks import transformer as bench


@pytest.fixture(scope="module")
def counters() -> dict[tuple[str, bool], dict[str, float]]:
    out = {}
    for technique in bench.TECHNIQUES:
        for ours in (False, True) if technique != "no technique" else (False,):
            hf = bench.build_hf(layers=4)
            out[(technique, ours)] = bench.measure(bench.Variant(technique, ours, hf), steps=2)
    return out


@pytest.mark.parametrize("technique", [t for t in bench.TECHNIQUES if t != "no technique"])
def test_callback_counters_equal_the_hand_written_ones(counters: dict, technique: str) -> None:  # type: ignore[type-arg]
    ours, hand = counters[(technique, True)], counters[(technique, False)]
    assert ours == hand


def test_the_techniques_change_the_counters_as_expected(counters: dict) -> None:  # type: ignore[type-arg]
    full = counters[("no technique", False)]

    def ratio(technique: str, key: str) -> float:
        return counters[(technique, True)][key] / full[key]

    # 4 layers: the output layer (vocabulary 4096) is a large share of the work, so halves cut less than half
    assert ratio("freeze bottom half", "flops") < 0.9 and ratio("freeze bottom half", "opt_bytes") < 0.51
    assert ratio("detach bottom half", "saved") < 0.75 and ratio("detach bottom half", "opt_bytes") < 0.51
    assert ratio("checkpoint every layer", "flops") > 1.05 and ratio("checkpoint every layer", "saved") < 0.5
    assert ratio("selective backprop", "flops") < 0.6 and ratio("selective backprop", "saved") < 0.26
    assert ratio("mask sparse subset", "flops") == ratio("mask new-token rows", "opt_bytes") == 1.0
