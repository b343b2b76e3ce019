"""The LLM backward benchmark's deterministic counters on a tiny Llama: FLOPs and saved bytes, never times."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from benchmarks import llm_backward as bench

TINY = {"layers": 2, "width": 32, "heads": 2, "ffn": 64, "vocab": 64, "batch": 2, "seq": 16}


def test_counters_follow_each_technique() -> None:
    result = bench.measure(TINY, rounds=1, iters=1)
    c = result["counters"]
    plain = c["plain step"]["backward GFLOPs"]
    assert c[f"TokenSelection(keep={bench.KEEP})"]["backward GFLOPs"] == plain  # a loss mask: same FLOPs
    for rate in bench.RATES:  # DropBP's top-up drops at least rate x branches, and backward FLOPs fall
        assert len(result["drops"][rate]) >= rate * result["branches"]
        assert c[f"DropBackward(rate={rate})"]["backward GFLOPs"] < plain
    assert c["DropBackward(rate=0.5)"]["backward GFLOPs"] <= c["DropBackward(rate=0.25)"]["backward GFLOPs"]
    saved = {k: c[k]["saved MiB"] for k in ("plain step", "checkpoint matmul policy", "checkpoint full")}
    assert saved["checkpoint full"] < saved["checkpoint matmul policy"] < saved["plain step"]
    # full checkpointing recomputes forwards inside backward; the matmul policy recomputes no matmul
    assert c["checkpoint full"]["backward GFLOPs"] > c["checkpoint matmul policy"]["backward GFLOPs"] == plain


def test_dropped_backward_flops_add_up_per_branch() -> None:
    model, ids = bench.build(TINY)
    names = [n for n, _ in bench.branches(model)]
    state: dict[str, set[str]] = {"dropped": set()}
    handles = bench.drop_branch_outputs(bench.branches(model), lambda name: name in state["dropped"])
    plain = bench.backward_flops(model, ids)
    saving = {}
    for name in names:
        state["dropped"] = {name}
        saving[name] = plain - bench.backward_flops(model, ids)
    dropped = bench.drop_set(names, 0.5)
    state["dropped"] = dropped
    assert bench.backward_flops(model, ids) == plain - sum(saving[n] for n in dropped)
    handles.remove()
