"""DropBackward (DropBP) against hand-written detached branches, DropBP's allocation rule and FLOPs counts."""

from __future__ import annotations

import heapq
import random
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lit_partial import DropBackward
from lit_partial.conditions import uniform_draw
from lit_partial.errors import ConfigurationError
from lit_partial.functional import count_flops
from lit_partial.functional.drop_backward import (
    allocate_drop_rates,
    draw_drop_set,
    drop_branch_outputs,
    weighted_drop_rate,
)
from tests.helpers.trainers import RecordGrads, quiet_trainer

D, B = 8, 4
BRANCHES = [f"blocks.{i}.{kind}" for i in range(3) for kind in ("attn", "mlp")]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(D, D), nn.Tanh())
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.Tanh(), nn.Linear(2 * D, D))

    def forward(self, x: Tensor, dropped: frozenset[str] = frozenset(), prefix: str = "") -> Tensor:
        a = self.attn(x)
        x = x + (a.detach() if f"{prefix}attn" in dropped else a)
        m = self.mlp(x)
        return x + (m.detach() if f"{prefix}mlp" in dropped else m)


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(4, D), nn.Linear(D, 2)
        self.blocks = nn.ModuleList(Block() for _ in range(3))

    @override
    def forward(self, x: Tensor, dropped: frozenset[str] = frozenset()) -> Tensor:
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h, dropped, f"blocks.{i}.")
        return self.head(h)  # type: ignore[no-any-return]

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def data(n: int = 16) -> DataLoader[tuple[Tensor, ...]]:
    gen = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen)), B)


class RecordDrops(L.Callback):
    def __init__(self, cb: DropBackward) -> None:
        self.cb, self.sets = cb, []

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.sets.append(frozenset(self.cb.dropped))


def fit(cb: DropBackward, steps: int = 4, n: int = 16, **kw: Any) -> tuple[Net, RecordGrads, RecordDrops]:
    torch.manual_seed(0)
    model, record, drops = Net(), RecordGrads(), RecordDrops(cb)
    quiet_trainer(max_steps=steps, callbacks=[record, cb, drops], **kw).fit(model, data(n))
    return model, record, drops


def test_gradients_equal_hand_written_detached_branches_with_the_same_drop_set() -> None:
    _, record, drops = fit(DropBackward(["blocks.*.attn", "blocks.*.mlp"], rate=0.5, seed=3))
    assert len(set(drops.sets)) > 1  # the drop set changes from step to step
    torch.manual_seed(0)
    model = Net()
    opt = model.configure_optimizers()
    for step, (x, y) in enumerate(data()):
        draws = [uniform_draw(3, name, step, 0) for name in BRANCHES]
        dropped = frozenset(n for n, d in zip(BRANCHES, draw_drop_set([0.5] * 6, draws, 0.5), strict=True) if d)
        assert dropped == drops.sets[step] and len(dropped) >= 3  # topped up to half the branches
        opt.zero_grad()
        nn.functional.cross_entropy(model(x, dropped), y).backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert set(grads) == set(record.grads[step])
        assert all(torch.equal(record.grads[step][n], g) for n, g in grads.items())
        opt.step()


def test_backward_flops_fall_by_the_dropped_branches_and_flops_are_measured() -> None:
    cb = DropBackward("blocks.*.attn,blocks.*.mlp", rate=0.5)
    fit(cb, steps=1)
    assert cb.flops == {n: (2 * B * D * D if n.endswith("attn") else 2 * (2 * B * D * 2 * D)) for n in BRANCHES}
    torch.manual_seed(0)
    model, x = Net(), torch.randn(B, 4)
    full = count_flops(lambda: model(x).sum().backward())
    for dropped in ({"blocks.0.attn"}, {"blocks.1.mlp", "blocks.2.attn"}, set(BRANCHES)):
        chosen = [(n, model.get_submodule(n)) for n in BRANCHES]
        handles = drop_branch_outputs(chosen, lambda name, d=dropped: name in d)  # type: ignore[misc]
        flops = count_flops(lambda: model(x).sum().backward())
        handles.remove()
        assert flops == full - 2 * sum(cb.flops[n] for n in dropped)  # each branch's backward is 2x its forward


def dropbp_allocate(sens: list[float], flops: list[float], p: float, min_rate: float = 0.0) -> list[float]:
    """DropBP's allocate_p (C++ max-heap of (-C_i (p_i + 0.1), i)), written out with negated keys."""
    b = [min_rate] * len(flops)
    heap = [(sens[i] * (0.1 + min_rate), -i) for i in range(len(flops))]
    heapq.heapify(heap)
    f_sum, target = sum(flops) * (1 - min_rate), int((1 - p) * sum(flops))
    while f_sum > target:
        delta, j = heapq.heappop(heap)
        b[-j] = round(b[-j] + 0.1, 10)
        f_sum -= flops[-j] * 0.1
        if b[-j] < 0.9 - 1e-9:
            heapq.heappush(heap, (delta + 0.1 * sens[-j], j))
    return b


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.25, 0.5])
def test_allocation_equals_dropbp_greedy_rule_and_meets_the_flops_weighted_target(seed: int, p: float) -> None:
    rng = random.Random(seed)
    sens = [rng.random() for _ in range(8)]
    flops = [rng.choice([1000, 2000, 3000]) for _ in range(8)]
    rates = allocate_drop_rates(sens, flops, p)
    assert [round(r, 10) for r in rates] == dropbp_allocate(sens, flops, p)
    achieved = weighted_drop_rate(rates, flops)
    assert p - 1e-9 <= achieved < p + 0.1 * max(flops) / sum(flops)
    assert weighted_drop_rate([p] * 8, flops) == pytest.approx(p)  # uniform meets it exactly


def test_allocation_refuses_an_unreachable_target() -> None:
    with pytest.raises(ConfigurationError, match=r"cannot be reached with per-branch rates of at most 0\.3"):
        allocate_drop_rates([1.0, 1.0], [1, 1], 0.5, max_rate=0.3)
    with pytest.raises(ConfigurationError, match="one sensitivity per branch"):
        allocate_drop_rates([1.0], [1, 1], 0.5)


def test_sensitivity_pass_touches_no_parameter_gradient_optimizer_or_rng_and_matches_by_hand() -> None:
    seen: dict[str, Any] = {}

    class Spy(L.Callback):
        def __init__(self, key: str) -> None:
            self.key = key

        @override
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
            if trainer.global_step == 2:
                opt = trainer.optimizers[0]
                seen[self.key] = (
                    torch.get_rng_state(), random.getstate(),
                    {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                    {n: None if p.grad is None else p.grad.clone() for n, p in pl_module.named_parameters()},
                    {k: v["momentum_buffer"].clone() for k, v in opt.state_dict()["state"].items()},
                )  # fmt: skip

    cb = DropBackward(BRANCHES, rate=0.5, allocation="sensitivity", sensitivity_step=2)
    torch.manual_seed(0)
    quiet_trainer(max_steps=3, callbacks=[Spy("before"), cb, Spy("after")]).fit(Net(), data())
    before, after = seen["before"], seen["after"]
    assert torch.equal(before[0], after[0]) and before[1] == after[1]
    for b, a in zip(before[2:], after[2:], strict=True):
        assert b.keys() == a.keys() and all((b[k] is None and a[k] is None) or torch.equal(b[k], a[k]) for k in b)
    assert set(cb.sensitivities) == set(BRANCHES) and all(s > 0 for s in cb.sensitivities.values())
    rates = [cb.rates[n] for n in BRANCHES]
    assert rates == allocate_drop_rates([cb.sensitivities[n] for n in BRANCHES], [cb.flops[n] for n in BRANCHES], 0.5)


def test_sensitivities_equal_dropbp_definition_by_hand() -> None:
    cb = DropBackward(BRANCHES, rate=0.25, allocation="sensitivity")
    fit(cb, steps=1)
    torch.manual_seed(0)
    model = Net()
    x, y = next(iter(data()))

    def norms(dropped: frozenset[str]) -> Tensor:
        loss = nn.functional.cross_entropy(model(x, dropped), y)
        grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
        return torch.stack([torch.tensor(0.0) if g is None else g.norm() for g in grads])  # DropBP: 0 for no grad

    base = norms(frozenset())
    for name in BRANCHES:
        expected = float(((base - norms(frozenset([name]))) ** 2).sum())
        assert cb.sensitivities[name] == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_resume_draws_the_same_drop_sets_and_rates(tmp_path: Path) -> None:
    def make() -> DropBackward:
        return DropBackward(BRANCHES, rate=0.5, allocation="sensitivity", sensitivity_step=1)

    full_model, _, full = fit(make(), steps=-1, n=2 * B, max_epochs=2)  # two steps per epoch
    torch.manual_seed(0)
    first, cb1 = Net(), make()
    trainer = quiet_trainer(max_epochs=1, callbacks=[cb1])
    trainer.fit(first, data(2 * B))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    cb2 = make()
    drops = RecordDrops(cb2)
    resumed = Net()
    quiet_trainer(max_epochs=2, callbacks=[cb2, drops]).fit(resumed, data(2 * B), ckpt_path=tmp_path / "mid.ckpt")
    assert drops.sets == full.sets[2:] and cb2.rates == cb1.rates
    assert all(torch.equal(a, b) for a, b in zip(full_model.parameters(), resumed.parameters(), strict=True))


def test_teardown_leaves_the_model_as_it_was() -> None:
    model, _, _ = fit(DropBackward(BRANCHES, rate=0.5), steps=1)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 1.0}, r"`rate` must be a number in \[0, 1\), got 1.0"),
        ({"rate": "half"}, r"`rate` must be a number"),
        ({"allocation": "flops"}, r"`allocation` must be one of \('uniform', 'sensitivity'\), got 'flops'"),
        ({"seed": 1.5}, r"`seed` must be an integer, got 1.5"),
        ({"sensitivity_step": -1}, r"`sensitivity_step` must be an integer >= 0, got -1"),
        ({"min_rate": -0.1}, r"`min_rate` must be a number in \[0, 1\)"),
        ({"max_rate": 0}, r"`max_rate` must be a number in \(0, 1\], got 0"),
        ({"min_rate": 0.6}, r"`min_rate` \(0.6\) must not exceed `rate` \(0.5\)"),
        ({"top_up": "yes"}, r"`top_up` must be True or False"),
    ],
)
def test_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        DropBackward("blocks.*.mlp", **kwargs)


def test_hugging_face_llama_branches_match_hand_written_hooks() -> None:
    pytest.importorskip("transformers")
    from tests.hf._models import HFModule, build, loader

    cb = DropBackward("model.model.layers.*.self_attn,model.model.layers.*.mlp", rate=0.5, seed=1)
    torch.manual_seed(0)
    model, record, drops = HFModule(build("llama", dropout=0.0)), RecordGrads(), RecordDrops(cb)
    quiet_trainer(max_steps=1, callbacks=[record, cb, drops]).fit(model, loader("llama", n=4))
    (dropped,) = drops.sets
    assert len(dropped) == 2
    torch.manual_seed(0)
    plain = build("llama", dropout=0.0)
    handles = [
        plain.get_submodule(n.removeprefix("model.")).register_forward_hook(
            lambda m, a, out: (out[0].detach(), *out[1:]) if isinstance(out, tuple) else out.detach()
        )
        for n in dropped
    ]
    plain(**next(iter(loader("llama", n=4)))).loss.backward()
    for h in handles:
        h.remove()
    for name, p in plain.named_parameters():
        got = record.grads[0].get(f"model.{name}")
        if p.grad is None:  # a dropped branch, or the pre-norm that feeds only it (as in DropBP)
            assert got is None and ("layernorm" in name or any(f"model.{name}".startswith(d) for d in dropped))
        else:
            assert got is not None and torch.equal(got, p.grad), name
