from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_partial import GradientMasking, PartialBackpropMixin
from lit_partial.functional.mask_builders import MaskError, build_random_mask
from lit_partial.selectors import SelectorError
from tests.helpers import SaveParamsPerRank, assert_states_bitwise_equal, load_rank_states, quiet_trainer


class Tiny(PartialBackpropMixin, L.LightningModule):
    def __init__(self, opt: str = "adamw", seed: int = 0, **opt_kwargs: Any) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.opt, self.opt_kwargs = opt, opt_kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = {
            "sgd": torch.optim.SGD,
            "adam": torch.optim.Adam,
            "adamw": torch.optim.AdamW,
            "rmsprop": torch.optim.RMSprop,
            "adagrad": torch.optim.Adagrad,
            "lbfgs": torch.optim.LBFGS,
        }[self.opt]
        kwargs = {"lr": 0.05, **self.opt_kwargs}
        return cls(self.parameters(), **kwargs)


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 2, generator=g)), batch_size)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)


KEEP = {"net.0.weight": build_random_mask((8, 4), 0.3, seed=0, name="net.0.weight")}


def assert_masked_unchanged(model: nn.Module, before: dict[str, torch.Tensor], cb: GradientMasking) -> None:
    for name, keep in cb.masks.items():
        p = dict(model.named_parameters())[name]
        frozen = ~keep.expand_as(p)
        assert torch.equal(bits(p)[frozen], bits(before[name])[frozen]), name
        assert not torch.equal(p[~frozen], before[name][~frozen]), f"{name}: nothing learned"


OPTIMIZERS = {
    "sgd_momentum_nesterov_wd": ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.1)),
    "adam": ("adam", dict(weight_decay=0.1)),
    "adamw": ("adamw", dict(weight_decay=0.5)),
    "rmsprop": ("rmsprop", dict(momentum=0.5, weight_decay=0.1)),
    "adagrad": ("adagrad", dict(weight_decay=0.1)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_strict_masked_elements_bit_identical_with_accumulation_and_clipping(name: str) -> None:
    opt, kwargs = OPTIMIZERS[name]
    model = Tiny(opt, **kwargs)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cb = GradientMasking({"net.0.weight": KEEP["net.0.weight"], "net.2": {"kind": "rows", "index": [1]}})
    trainer = quiet_trainer(callbacks=[cb], max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.05)
    trainer.fit(model, loader())
    assert trainer.global_step == 4
    assert_masked_unchanged(model, before, cb)


def test_non_strict_lets_masked_elements_drift_under_adamw() -> None:
    model = Tiny("adamw", weight_decay=0.5)
    before = model.net[0].weight.detach().clone()
    quiet_trainer(callbacks=[GradientMasking(KEEP, strict=False)], max_epochs=1).fit(model, loader())
    frozen = ~KEEP["net.0.weight"]
    assert (model.net[0].weight[frozen] - before[frozen]).abs().max() > 0  # documented: only plain SGD is exact


def test_bf16_mixed_with_nan_and_inf_in_masked_gradients() -> None:
    model = Tiny("adamw", weight_decay=0.1)
    keep = KEEP["net.0.weight"]
    poison = torch.where(keep, 0.0, torch.tensor([math.nan, math.inf, -math.inf]).repeat(11)[:32].view(8, 4))
    model.net[0].weight.register_hook(lambda g: g + poison)  # masked positions get NaN/inf gradients
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cb = GradientMasking(KEEP)
    quiet_trainer(callbacks=[cb], max_epochs=2, precision="bf16-mixed", gradient_clip_val=1.0).fit(model, loader())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert_masked_unchanged(model, before, cb)


class ReferenceCheck(Callback):
    """Records parameters and their masks right before every optimizer step (after masking)."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.before = pl_module.net[0].weight.detach().clone()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.steps.append((self.before, pl_module.net[0].weight.detach().clone()))


def test_where_masks_recomputed_every_step_freeze_non_positive_weights() -> None:
    model = Tiny("adamw", lr=0.2, weight_decay=0.1)
    rec = ReferenceCheck()
    cb = GradientMasking({"net.0.weight": {"kind": "where", "op": ">", "value": 0.0}})
    quiet_trainer(callbacks=[cb, rec], max_epochs=3).fit(model, loader())
    flipped = 0
    for before, after in rec.steps:
        frozen = before <= 0  # the mask at that step: only positive weights learn
        assert torch.equal(bits(after)[frozen], bits(before)[frozen])
        flipped += int(((before > 0) & (after <= 0)).sum())
    assert flipped > 0  # the mask changed mid-training, and newly non-positive weights froze


def test_matches_plain_pytorch_reference_with_accumulation_and_clipping() -> None:
    """Lightning + GradientMasking == a hand-written loop: accumulate 2, mask, clip (masked norm), SGD momentum."""
    keep = KEEP["net.0.weight"]
    model = Tiny("sgd", momentum=0.9, weight_decay=0.1)
    ref = Tiny("sgd", momentum=0.9, weight_decay=0.1)
    cb = GradientMasking({"net.0.weight": keep})
    quiet_trainer(callbacks=[cb], max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.05).fit(model, loader())

    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    w = ref.net[0].weight
    batches = list(loader())
    for i in range(0, len(batches), 2):
        for x, y in batches[i : i + 2]:
            (nn.functional.mse_loss(ref(x), y) / 2).backward()
        w.grad = torch.where(keep, w.grad, torch.zeros(()))
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        old = w.detach().clone()
        opt.step()
        w.data = torch.where(keep, w.data, old)
        opt.zero_grad()
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b), name


class ClipRecorder(Tiny):
    """Records the total gradient norm that gradient clipping is handed, at every optimizer step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.norms: list[torch.Tensor] = []

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, **kwargs: Any) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        self.norms.append(torch.nn.utils.get_total_norm(grads))
        super().configure_gradient_clipping(optimizer, gradient_clip_val, **kwargs)


@pytest.mark.parametrize("strict", [True, False])
def test_adamw_matches_hand_written_loop_and_clipping_sees_the_masked_norm(strict: bool) -> None:
    """AdamW, accumulate 2, clip: Lightning + GradientMasking == a hand-written loop, bit for bit.

    The clipping norm is the masked one, every parameter and every first moment is the hand-written loop's, and
    so is the second moment of every unmasked element; masked second moments hold the floor instead of 0.
    """
    keep = KEEP["net.0.weight"]
    model, ref = ClipRecorder("adamw", weight_decay=0.1), Tiny("adamw", weight_decay=0.1)
    cb = GradientMasking({"net.0.weight": keep}, strict=strict)
    trainer = quiet_trainer(callbacks=[cb], max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.05)
    trainer.fit(model, loader())

    opt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    w, norms = ref.net[0].weight, []
    batches = list(loader())
    for _ in range(2):
        for i in range(0, len(batches), 2):
            for x, y in batches[i : i + 2]:
                (nn.functional.mse_loss(ref(x), y) / 2).backward()
            w.grad = torch.where(keep, w.grad, torch.zeros(()))
            norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))
            old = w.detach().clone()
            opt.step()
            if strict:
                w.data = torch.where(keep, w.data, old)
            opt.zero_grad()
    assert len(model.norms) == len(norms) == 4
    for got, expected in zip(model.norms, norms, strict=True):
        assert torch.equal(got, expected)
    state = trainer.optimizers[0].state
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(bits(a), bits(b)), name
        assert torch.equal(bits(state[a]["exp_avg"]), bits(opt.state[b]["exp_avg"])), name
        v, v_ref = state[a]["exp_avg_sq"], opt.state[b]["exp_avg_sq"]
        frozen = ~keep if name == "net.0.weight" else torch.zeros_like(v, dtype=torch.bool)
        assert torch.equal(bits(v)[~frozen], bits(v_ref)[~frozen]), name
        assert (v[frozen] >= 2.0**-125).all() and (v_ref[frozen] == 0).all(), name


def test_lbfgs_static_masks_supported_where_masks_rejected() -> None:
    model = Tiny("lbfgs", lr=0.5, max_iter=4)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cb = GradientMasking(KEEP)
    quiet_trainer(callbacks=[cb], max_steps=2).fit(model, loader())
    assert_masked_unchanged(model, before, cb)
    bad = GradientMasking({"net.0.weight": {"kind": "where", "op": ">", "value": 0.0}})
    with pytest.raises(MaskError, match="optimizer 0 is LBFGS, whose step re-evaluates the closure"):
        quiet_trainer(callbacks=[bad], max_steps=1).fit(Tiny("lbfgs"), loader())


def test_sources_file_callable_hooks_removed_summary_and_logging(tmp_path: Path) -> None:
    model = Tiny("adamw")
    path = tmp_path / "masks.pt"
    torch.save({"net.0.weight": KEEP["net.0.weight"].float()}, path)
    cb = GradientMasking(
        {"net.0.weight": str(path), "net.2.weight": lambda name, p: p.abs() > 0.2, "net.0.bias": torch.tensor(0)}
    )
    trainer = quiet_trainer(
        callbacks=[cb], max_epochs=1, logger=L.pytorch.loggers.CSVLogger(tmp_path), log_every_n_steps=1
    )
    trainer.fit(model, loader())
    assert torch.equal(cb.masks["net.0.weight"], KEEP["net.0.weight"])
    opt = trainer.optimizers[0]
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks  # removed in teardown
    summary = model.partial_summary()
    frozen = 32 - int(KEEP["net.0.weight"].sum()) + 8 + int((cb.masks["net.2.weight"] == 0).sum())
    assert summary.splitlines()[-1].split()[3] == f"{frozen:,}"
    assert trainer.callback_metrics["masked_fraction/net.0.bias"] == 1.0
    assert "masked_fraction/net.0.weight" in trainer.callback_metrics


def _resume_fit(tmp_path: Path, steps: int, ckpt: str | None = None, seed: int = 0) -> tuple[Tiny, L.Trainer]:
    model = Tiny("adamw", seed=seed, weight_decay=0.1)
    cb = GradientMasking({"net.0.weight": {"kind": "magnitude", "keep": 0.3}, "net.2": {"kind": "random", "keep": 0.5}})
    trainer = quiet_trainer(callbacks=[cb], max_epochs=steps // 2, enable_checkpointing=False)
    trainer.fit(model, loader(16, 8), ckpt_path=ckpt)
    return model, trainer


def test_resume_is_exact(tmp_path: Path) -> None:
    full, _ = _resume_fit(tmp_path, 4)
    _, first = _resume_fit(tmp_path, 2)
    first.save_checkpoint(tmp_path / "half.ckpt")
    # Different init: a magnitude mask rebuilt from these weights would differ; the checkpoint's must win.
    resumed, _ = _resume_fit(tmp_path, 4, ckpt=str(tmp_path / "half.ckpt"), seed=5)
    assert_states_bitwise_equal(full.state_dict(), resumed.state_dict())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_spawn_random_masks_ranks_bit_identical(tmp_path: Path) -> None:
    model = Tiny("adamw", weight_decay=0.1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cb = GradientMasking(
        {"net.0": {"kind": "random", "keep": 0.3, "seed": 3}, "net.2.weight": {"kind": "rows", "index": [0]}}
    )
    trainer = quiet_trainer(callbacks=[cb, SaveParamsPerRank(tmp_path)], strategy="ddp_spawn", devices=2, max_epochs=2)
    trainer.fit(model, loader())
    rank0, rank1 = load_rank_states(tmp_path)
    assert_states_bitwise_equal(rank0, rank1)
    keep = build_random_mask((8, 4), 0.3, seed=3, name="net.0.weight")
    assert torch.equal(bits(rank0["net.0.weight"])[~keep], bits(before["net.0.weight"])[~keep])
    assert not torch.equal(rank0["net.0.weight"][keep], before["net.0.weight"][keep])
    assert torch.equal(rank0["net.2.weight"][1], before["net.2.weight"][1])


# --- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        ([("w", 1)], MaskError, "must map parameter selectors to masks, got list"),
        ({}, MaskError, "`masks` is empty"),
        ({"w": torch.tensor([0.0, 0.5])}, MaskError, r"masks\['w'\] holds values other than 0/1 \(e.g. \[0.5\]"),
        ({"w": {"kind": "random", "keep": 0}}, MaskError, r"keep=0 must be a fraction in \(0, 1\]"),
        ({"w": {"kind": "random", "keep": 1.01}}, MaskError, r"keep=1.01 must be a fraction in \(0, 1\]"),
        ({"w": {"kind": "topk"}}, MaskError, "unknown mask kind 'topk'; valid kinds are 'random', 'magnitude'"),
        ({"w": "missing.pt"}, MaskError, "mask file 'missing.pt' does not exist"),
        ({"w": 3}, MaskError, r"masks\['w'\] is a int; expected a 0/1 tensor"),
        ({"": torch.ones(1)}, SelectorError, "every selector must be"),
    ],
)
def test_init_errors(masks: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        GradientMasking(masks)


@pytest.mark.parametrize("arg", ["strict", "log_fraction", "reuse_snapshots"])
def test_init_rejects_non_bool_flags(arg: str) -> None:
    with pytest.raises(TypeError, match=f"`{arg}` must be True or False, got 1"):
        GradientMasking(KEEP, **{arg: 1})


@pytest.mark.parametrize(
    ("masks", "error", "match"),
    [
        ({"net.9": torch.ones(1)}, SelectorError, r"selector 'net.9' matched no parameter .*did you mean"),
        ({"net.0.weight": torch.ones(4, 8)}, MaskError, r"mask of net.0.weight has shape \(4, 8\).*shape \(8, 4\)"),
        ({"net.0.weight": lambda n, p: p * 3}, MaskError, "mask of net.0.weight holds values other than 0/1"),
        ({"net.0.bias": {"kind": "columns", "index": [0]}}, MaskError, r"net.0.bias has shape \(8,\): no dim 1"),
        ({"net.0": torch.ones(1), "net.0.bias": torch.ones(1)}, MaskError, "'net.0.bias' is selected by masks 'net.0'"),
    ],
)
def test_setup_errors_before_the_first_step(masks: Any, error: type, match: str) -> None:
    model = Tiny()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(error, match=match):
        quiet_trainer(callbacks=[GradientMasking(masks)], max_steps=1).fit(model, loader())
    assert_states_bitwise_equal(before, dict(model.named_parameters()))


def test_file_without_the_parameter(tmp_path: Path) -> None:
    torch.save({"other": torch.ones(1)}, tmp_path / "m.pt")
    with pytest.raises(MaskError, match=r"has no mask for parameter 'net.0.weight' \(it holds \['other'\]\)"):
        quiet_trainer(callbacks=[GradientMasking({"net.0.weight": tmp_path / "m.pt"})], max_steps=1).fit(
            Tiny(), loader()
        )


def test_state_keys_let_two_instances_coexist() -> None:
    a = GradientMasking({"net.0.weight": torch.ones(1)})
    b = GradientMasking({"net.2.weight": torch.ones(1)})
    assert a.state_key != b.state_key and "GradientMasking" in a.state_key


def test_fp16_scaler_ignores_overflow_in_masked_positions() -> None:
    model = Tiny("sgd", momentum=0.9)
    keep = KEEP["net.0.weight"]
    model.net[0].weight.register_hook(lambda g: torch.where(keep, g, torch.tensor(math.inf)))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    cb = GradientMasking(KEEP)
    amp = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))  # Trainer maps CPU fp16 to bf16
    trainer = quiet_trainer(callbacks=[cb], max_steps=3, plugins=[amp])
    trainer.fit(model, loader())
    scaler = trainer.precision_plugin.scaler
    assert scaler.get_scale() == 2.0**16  # never backed off: no step was skipped
    assert_masked_unchanged(model, before, cb)
    assert not torch.equal(model.net[2].weight, before["net.2.weight"])
