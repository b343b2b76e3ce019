"""torch.compile: graphs and graph breaks per callback (the README's table), and compiled runs equal eager ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import fx

from lit_partial import LayerFreezing, StochasticDepth
from lit_partial.attach import register_gate
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.helpers.compile import BACKEND, SCENARIOS, dynamo_counts, prepare, run
from tests.helpers.models import TinyNet, tiny_loader

#: scenario -> (graphs, graph breaks counted) over 8 training steps with `model.compile()`; the README's table.
#: Graphs = one per distinct pattern of decisions the run met (`patterns`), plus what the scenario says.
EXPECTED: dict[str, tuple[int, int, int]] = {  # graphs, breaks, distinct decision patterns
    "no callback": (1, 0, 1),
    "LayerFreezing, unfreeze at step 4": (2, 0, 1),  # requires_grad changes once: one more graph
    "GradientMasking, rows": (1, 0, 1),
    "ConditionalDetach, steps [2, 5)": (2, 0, 2),
    "ConditionalDetach, gate, probability 0.5": (2, 0, 2),
    "ConditionalDetach, per-sample probability": (1, 0, 1),
    "ConditionalDetach, grad_scale 0.5 every 2nd step": (2, 0, 2),
    "ConditionalDetach, per-sample statistic": (1, 0, 1),
    # the data decide whether backward runs below the stem: one break (Tensor.item) met in 5 nested frames,
    # the code after it compiled once per outcome
    "ConditionalDetach, whole-batch statistic": (5, 5, 1),
    # skips: + 1 graph, once: the first step records each skipped module's output structure (so that a skipped
    # call can build its output without running the module), which changes what later steps' forwards read
    "ConditionalSkip, 3 blocks, probability 0.3": (6, 0, 5),
    "StochasticDepth, 3 blocks, drop_rate 0.5": (6, 0, 5),
    "StochasticDepth, per_sample": (2, 0, 1),
    "ActivationDetach, at + checkpoint": (1, 0, 1),
    "ActivationMemoryMonitor": (1, 0, 1),
    "SelectiveBackprop, topk 0.5": (2, 0, 1),  # the scoring forward (eval, no grad, whole batch): one more graph
}


def test_dynamo_counters_still_count_graphs() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        y = x * 2
        torch._dynamo.graph_break()
        return y + 1

    with dynamo_counts() as counts:
        torch.compile(f, backend=BACKEND)(torch.ones(2))
    assert (counts.graphs, counts.breaks) == (2, 1), (
        f"torch {torch.__version__}: torch._dynamo.utils.counters no longer counts graphs/breaks as "
        "tests/helpers/compile.py expects; update dynamo_counts()."
    )


def test_the_table_lists_every_scenario() -> None:
    assert set(EXPECTED) == set(SCENARIOS)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(EXPECTED))
def test_graph_counts_under_model_compile_and_parameters_equal_eager(scenario: str) -> None:
    compiled, counts, patterns = run(scenario, "model.compile()")
    assert (counts.graphs, counts.breaks, patterns.distinct) == EXPECTED[scenario], counts.reasons
    eager, _, eager_patterns = run(scenario, None)
    assert eager_patterns.patterns == patterns.patterns  # the same decisions, step by step
    assert_states_bitwise_equal(eager.state_dict(), compiled.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("how", ["torch.compile(model)", "submodule"])
@pytest.mark.parametrize(
    "scenario",
    [
        "ConditionalDetach, steps [2, 5)",
        "StochasticDepth, 3 blocks, drop_rate 0.5",
        "ActivationDetach, at + checkpoint",
    ],
)
def test_other_ways_of_compiling_give_one_graph_per_pattern(scenario: str, how: str) -> None:
    compiled, counts, patterns = run(scenario, how)
    assert counts.breaks == 0, counts.reasons
    assert (counts.graphs, patterns.distinct) == EXPECTED[scenario][0::2]
    eager, _, _ = run(scenario, None)
    # a submodule compiled in place renames its parameters (blocks._orig_mod.*) but draws as before
    state = {k.replace("._orig_mod", ""): v for k, v in compiled.state_dict().items()}
    assert_states_bitwise_equal(eager.state_dict(), state)


class _Capture:
    """A torch.compile backend that keeps the FX graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.graphs: list[fx.GraphModule] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Any) -> Any:
        self.graphs.append(gm)
        return gm.forward

    def ops(self) -> list[str]:
        return [str(n.target) for g in self.graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]


class _NoGate(TinyNet):
    def gate(self, name: str, x: Any) -> Any:
        return x


def _graph_ops(model: TinyNet) -> list[str]:
    capture = _Capture()
    model.compile(backend=capture)
    model(torch.randn(4, 4)).sum().backward()
    torch._dynamo.reset()
    return capture.ops()


def test_gate_compiles_to_nothing_when_no_rule_uses_it() -> None:
    torch.manual_seed(0)
    plain = _graph_ops(_NoGate())
    assert _graph_ops(TinyNet()) == plain  # no callback at all
    ruled = TinyNet()
    handle = register_gate(ruled, "other", lambda x: x * 2)  # a rule on another gate
    assert _graph_ops(ruled) == plain
    handle.remove()


@pytest.mark.slow
def test_resume_under_compile_is_exact(tmp_path: Path) -> None:
    def fit(epochs: int, ckpt: Path | None = None, save: Path | None = None, drop: bool = True) -> TinyNet:
        torch.manual_seed(0)
        model = TinyNet()
        model.compile(backend=BACKEND)
        trainer = quiet_trainer(max_epochs=epochs, callbacks=[StochasticDepth("blocks.*", 0.5)] if drop else [])
        trainer.fit(model, tiny_loader(), ckpt_path=ckpt)
        if save is not None:
            trainer.save_checkpoint(save)
        return model

    with dynamo_counts():
        full = fit(3)
    with dynamo_counts():
        fit(1, save=tmp_path / "mid.ckpt")
    with dynamo_counts():
        resumed = fit(3, ckpt=tmp_path / "mid.ckpt")
    assert_states_bitwise_equal(full.state_dict(), resumed.state_dict())
    with dynamo_counts():
        plain = fit(3, drop=False)  # blocks were dropped: the run is not plain training
    assert any(not torch.equal(plain.state_dict()[k], v) for k, v in full.state_dict().items())


def test_selectors_see_through_a_submodule_compiled_in_place() -> None:
    from lit_partial.selection import canonical_name, select_modules, select_parameters

    model = TinyNet()
    model.blocks = torch.compile(model.blocks, backend=BACKEND)  # type: ignore[assignment]
    plain = [name for name, _ in select_modules(model, "blocks.*")]
    assert plain == ["blocks._orig_mod.0", "blocks._orig_mod.1", "blocks._orig_mod.2"]
    assert [n for n, _ in select_modules(model, "blocks._orig_mod.1")] == ["blocks._orig_mod.1"]  # the other way
    assert [canonical_name(n) for n, _ in select_parameters(model, "blocks.0.fc1")] == [
        "blocks.0.fc1.weight",
        "blocks.0.fc1.bias",
    ]


class _Snapshots(L.Callback):
    """Every parameter before each training step and after the last: ``snaps[k]`` is what step ``k`` started from."""

    def __init__(self) -> None:
        self.snaps: list[dict[str, torch.Tensor]] = []

    def _take(self, pl_module: L.LightningModule) -> None:
        self.snaps.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._take(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take(pl_module)


def _toggled_run(how: str | None) -> tuple[list[dict[str, torch.Tensor]], Any]:
    # The stem is frozen, released at step 3 and frozen again at step 6; blocks.0 the other way round. Step 6 goes
    # back to the requires_grad pattern of step 0: what pytorch/pytorch#139476 is about (Dynamo re-using a frame
    # compiled for another pattern would compute gradients for frozen parameters, or none for released ones).
    schedule = [
        {"step": 3, "unfreeze": "stem", "freeze": "blocks.0"},
        {"step": 6, "unfreeze": "blocks.0", "freeze": "stem"},
    ]
    torch.manual_seed(0)
    model = TinyNet()
    fitted = prepare(model, how)
    snapshots = _Snapshots()
    with dynamo_counts() as counts:
        quiet_trainer(max_steps=9, callbacks=[LayerFreezing(frozen="stem", schedule=schedule), snapshots]).fit(
            fitted, tiny_loader(n=80)
        )
    return snapshots.snaps, counts


@pytest.mark.slow
@pytest.mark.parametrize("how", ["model.compile()", "torch.compile(model)"])
def test_freezing_releasing_and_refreezing_under_compile_equals_eager_bit_for_bit_in_two_graphs(how: str) -> None:
    eager, _ = _toggled_run(None)
    compiled, counts = _toggled_run(how)
    assert len(compiled) == len(eager) == 10  # before steps 0..8, and after the last
    # Bit-identical, not merely close: the aot_eager backend runs the ATen kernels eager runs, in the same order
    # (inductor would fuse them and reorder floating-point sums, so there only allclose could hold).
    for step, (c, e) in enumerate(zip(compiled, eager, strict=True)):
        try:
            assert_states_bitwise_equal(c, e)
        except AssertionError as err:
            raise AssertionError(f"before step {step}: {err}") from None
    for name, frozen in (("stem.weight", [(0, 3), (6, 9)]), ("blocks.0.fc1.weight", [(3, 6)])):
        for start, end in frozen:  # frozen from the start of step `start` to the start of step `end`: unchanged
            assert all(torch.equal(compiled[start][name], compiled[k][name]) for k in range(start, end + 1)), name
        trained = {0, 1, 2, 3, 4, 5, 6, 7, 8} - {k for start, end in frozen for k in range(start, end)}
        assert all(not torch.equal(compiled[k][name], compiled[k + 1][name]) for k in trained), name
    # One graph per requires_grad pattern: step 6 goes back to step 0's pattern and re-uses its graph, correctly.
    assert (counts.graphs, counts.breaks) == (2, 0), counts.reasons


@pytest.mark.slow
def test_a_drop_rate_warmup_compiles_one_graph_per_pattern_of_decisions_like_eager() -> None:
    from tests.helpers.compile import RecordPatterns

    def go(how: str | None) -> tuple[TinyNet, Any, RecordPatterns]:
        torch.manual_seed(0)
        model, patterns = TinyNet(), RecordPatterns()
        depth = StochasticDepth("blocks.*", 0.5, drop_warmup=0.5, drop_distribution="uniform")
        with dynamo_counts() as counts:
            quiet_trainer(max_steps=12, callbacks=[depth, patterns]).fit(prepare(model, how), tiny_loader(n=96))
        return model, counts, patterns

    compiled, counts, patterns = go("model.compile()")
    eager, _, eager_patterns = go(None)
    assert eager_patterns.patterns == patterns.patterns
    # the rate changes every warm-up step, but it is read before the step: graphs follow the decisions only
    # (+ 1: the first step records the blocks' output structure, as in the table above)
    assert (counts.graphs, counts.breaks) == (patterns.distinct + 1, 0), counts.reasons
    assert patterns.distinct < 12
    assert_states_bitwise_equal(eager.state_dict(), compiled.state_dict())
