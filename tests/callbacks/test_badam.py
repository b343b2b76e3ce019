"""BAdam side by side with the ``badam`` package's ``BlockOptimizer``, bit for bit, and where we differ on purpose."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_partial import BAdam, LayerFreezing
from lit_partial.errors import ConfigurationError
from lit_partial.functional.layer_sampling import active_block
from tests.callbacks._stack import LR, assert_bitwise, loader, make, plain_loop
from tests.helpers import quiet_trainer

N, K, STEPS = 4, 2, 9  # 9 steps of 2 per block: 4 switches after the first block
OUTSIDE = ["stem", "head"]  # BlockOptimizer freezes what is in no block; LayerFreezing does it beside BAdam


def block_optimizer_run(model: nn.Module, order: str, start_block: int | None, first_gets_k: bool) -> nn.Module:
    """The reference: ``BlockOptimizer`` over torch AdamW (weight decay 0) in a plain loop."""
    badam = pytest.importorskip("badam")
    model = copy.deepcopy(model)
    base = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "BAdam expects fp16/bf16" (an fp32 master of fp32 is exact)
        opt = badam.BlockOptimizer(
            base, list(model.named_parameters()), block_prefix_list=[[f"blocks.{i}."] for i in range(N)],
            switch_block_every=K, switch_mode=order, start_block=start_block, verbose=0,
        )  # fmt: skip
    if first_gets_k:
        opt.global_step = -1  # BlockOptimizer switches when (global_step + 1) % K == 0: its first block gets K-1
    batches = iter(loader())
    for _ in range(STEPS):
        x, y = next(batches)
        F.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def ours(order: str, start_block: int | None, **kwargs: Any) -> nn.Module:
    model = make(N, **kwargs)
    callbacks = [LayerFreezing(frozen=OUTSIDE), BAdam("blocks.*", K, order, start_block)]
    quiet_trainer(max_steps=STEPS, callbacks=callbacks).fit(model, loader())
    return model


@pytest.mark.parametrize(("order", "start_block"), [("ascending", None), ("descending", None), ("fixed", 1)])
def test_equals_block_optimizer_bit_for_bit_over_four_switches(order: str, start_block: int | None) -> None:
    want = block_optimizer_run(make(N), order, start_block, first_gets_k=True)
    got = ours(order, start_block)
    assert_bitwise(got, want)
    if order != "fixed":  # every block trained: the comparison covers each switch
        assert all(not torch.equal(p, q) for p, q in zip(got.parameters(), make(N).parameters(), strict=True)
                   if p.requires_grad)  # fmt: skip


def test_the_reference_gives_its_first_block_one_update_fewer() -> None:
    # Difference (a): unpatched, BlockOptimizer's first switch comes after K-1 steps; so the runs differ.
    plain = block_optimizer_run(make(N), "ascending", None, first_gets_k=False)
    patched = block_optimizer_run(make(N), "ascending", None, first_gets_k=True)
    assert not torch.equal(plain.blocks[0].fc1.weight, patched.blocks[0].fc1.weight)
    assert [active_block(s, N, K, "ascending") for s in range(4)] == [0, 0, 1, 1]  # ours: K each, the first too


def test_equals_a_plain_loop_of_the_same_schedule() -> None:
    def active(step: int) -> list[int]:
        return [active_block(step, N, K, "descending")]

    model = make(N)
    for name in OUTSIDE:
        model.get_submodule(name).requires_grad_(False)
    want = plain_loop(model, loader(), STEPS, active, lambda step, a: list(range(N)), K)
    assert_bitwise(ours("descending", None), want)


def test_parameter_groups_keep_their_learning_rate_and_weight_decay() -> None:
    # Differences (b), (d): BlockOptimizer rebuilds two groups from the defaults, so group 1's lr and decay are lost.
    badam = pytest.importorskip("badam")

    def groups(model: nn.Module) -> list[dict[str, Any]]:
        low = [p for n, p in model.named_parameters() if n.startswith(("blocks.0.", "blocks.1."))]
        rest = [p for n, p in model.named_parameters() if not n.startswith(("blocks.0.", "blocks.1."))]
        return [{"params": rest}, {"params": low, "lr": LR * 0.1, "weight_decay": 0.1}]

    model = make(N)
    reference = copy.deepcopy(model)
    for name in OUTSIDE:
        reference.get_submodule(name).requires_grad_(False)
    want = plain_loop(
        reference, loader(), STEPS, lambda s: [active_block(s, N, K, "ascending")], lambda s, a: list(range(N)), K,
        optimizer=lambda m: torch.optim.AdamW(groups(m), lr=LR, weight_decay=0.0),
    )  # fmt: skip
    model.configure_optimizers = lambda: torch.optim.AdamW(groups(model), lr=LR, weight_decay=0.0)  # type: ignore[method-assign]
    callbacks = [LayerFreezing(frozen=OUTSIDE), BAdam("blocks.*", K, "ascending")]
    trainer = quiet_trainer(max_steps=STEPS, callbacks=callbacks)
    trainer.fit(model, loader())
    assert_bitwise(model, want)
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [LR, LR * 0.1]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        probe = make(N)
        ref = badam.BlockOptimizer(
            torch.optim.AdamW(groups(probe), lr=LR), list(probe.named_parameters()),
            block_prefix_list=[["blocks.0."]], switch_block_every=K, verbose=0,
        )  # fmt: skip
    assert {g["lr"] for g in ref.base_optimizer.param_groups} == {LR}  # group 1's LR * 0.1 is gone
    assert {g["weight_decay"] for g in ref.base_optimizer.param_groups} == {0.01}  # torch's default, biases too


@pytest.mark.parametrize("interval", [2, 3], ids=["mid_period", "period_boundary"])
def test_resume_is_bit_identical_where_the_reference_saves_no_block(tmp_path: Path, interval: int) -> None:
    def run(max_epochs: int, ckpt: Path | None = None, model: nn.Module | None = None) -> Any:
        model = model or make(N)
        callbacks = [LayerFreezing(frozen=OUTSIDE), BAdam("blocks.*", interval, "descending")]
        trainer = quiet_trainer(max_epochs=max_epochs, callbacks=callbacks)
        trainer.fit(model, loader(n=12), ckpt_path=ckpt)  # 3 steps per epoch: the checkpoint follows step 3
        return trainer, model

    _, full = run(3)
    trainer, _ = run(1)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    _, resumed = run(3, tmp_path / "mid.ckpt")
    assert_bitwise(resumed, full)
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]
    (badam_state,) = [v for k, v in state.items() if k.startswith("BAdam")]
    assert badam_state["period"] == 2 // interval and badam_state["active"] == [f"blocks.{3 - 2 // interval}"]


def test_random_order_visits_every_block_once_per_pass_and_leaves_the_global_rng_alone() -> None:
    rng = torch.get_rng_state()
    seen = [active_block(s, N, 1, "random", seed=5) for s in range(3 * N)]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(sorted(seen[i : i + N]) == list(range(N)) for i in range(0, 3 * N, N))
    assert seen[:N] != seen[N : 2 * N] or seen[N : 2 * N] != seen[2 * N :]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"switch_every": 0}, r"`switch_every` is 0; expected an integer >= 1"),
        ({"order": "up"}, r"`order` is 'up'; expected one of ascending, descending, random, fixed"),
        ({"start_block": -1}, r"`start_block` is -1; expected an integer >= 0"),
        ({"order": "random", "start_block": 1}, r"`start_block` is given with order='random'"),
        ({"seed": "x"}, r"`seed` is 'x'; expected an integer"),
        ({"reset_optimizer_state": 1}, r"`reset_optimizer_state` is 1; expected True or False"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        BAdam("blocks.*", **kwargs)


def test_a_start_block_beyond_the_blocks_is_refused_at_setup() -> None:
    with pytest.raises(ConfigurationError, match=r"start_block=4 but `blocks`=\['blocks.\*'\] selects 4 blocks"):
        quiet_trainer(max_steps=1, callbacks=[BAdam("blocks.*", 1, "fixed", 4)]).fit(make(N), loader())
