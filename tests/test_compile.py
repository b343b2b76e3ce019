"""torch.compile: graphs and graph breaks per callback (the README's table), and compiled runs equal eager ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import fx

from lit_partial import StochasticDepth
from lit_partial.attach import register_gate
from tests._compile import BACKEND, SCENARIOS, dynamo_counts, run
from tests._ddp_script_dynamic import TinyNet, tiny_loader
from tests.helpers import assert_states_bitwise_equal, quiet_trainer

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
        f"torch {torch.__version__}: torch._dynamo.utils.counters no longer counts graphs/breaks as tests/_compile.py "
        "expects; update dynamo_counts()."
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
    def fit(epochs: int, ckpt: Path | None = None, save: Path | None = None) -> TinyNet:
        torch.manual_seed(0)
        model = TinyNet()
        model.compile(backend=BACKEND)
        trainer = quiet_trainer(max_epochs=epochs, callbacks=[StochasticDepth("blocks.*", 0.5)])
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
