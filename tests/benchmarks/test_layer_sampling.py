"""The layer-sampling benchmark's deterministic counters: ours equal the hand-written schedules', LMFlow's grows."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from benchmarks import layer_sampling as bench


@pytest.mark.slow
def test_state_bytes_and_backward_flops_equal_the_hand_written_schedules() -> None:
    hf = bench.build_hf()
    steps = 3 * bench.K + 1  # four periods
    probes = {name: bench.fit(hf, hand, factory(), steps) for name, (hand, factory) in bench.VARIANTS.items()}
    for ours, hand in (("LISA (ours)", "LISA by hand"), ("BAdam (ours)", "BAdam by hand")):
        assert probes[ours].state_bytes == probes[hand].state_bytes
        assert probes[ours].backward_flops == probes[hand].backward_flops
    full = probes["full fine-tuning"]
    assert probes["BAdam (ours)"].state_bytes < probes["LISA (ours)"].state_bytes < full.state_bytes
    assert probes["LISA (ours)"].state_bytes < probes["LISA, state kept (LMFlow)"].state_bytes
    assert probes["BAdam (ours)"].backward_flops < full.backward_flops
