"""ConditionalSkip on modules called with many arguments and returning structures (Hugging Face 4.x-style layers).

A skipped call runs no part of the module, its first call included, and returns its input in the structure
the module's output has: learned from calls that ran, shared by layers of one class called alike, or assumed
by convention and checked later.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lit_partial import ConditionalSkip, PartialBackpropMixin, StochasticDepth
from lit_partial.callbacks._output_layout import learn_layout, mix_rows, skipped_output
from lit_partial.conditions import Probability, StepContext
from lit_partial.errors import IncompatibleModuleError
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.helpers.models import tiny_loader
from tests.helpers.resnet import ResNetModule, image_loader

Out = namedtuple("Out", "hidden attn cache")


@dataclass
class LayerOutput:  # a ModelOutput-like dataclass
    hidden: Tensor
    attn: Tensor | None = None
    cache: Any = None


class Memory:
    """A cache passed into every layer and returned by it; layers that run append to it."""

    def __init__(self) -> None:
        self.seen: list[int] = []


def pack(kind: str, hidden: Tensor, attn: Tensor, cache: Memory) -> Any:
    if kind == "tuple":
        return hidden, attn, cache
    if kind == "namedtuple":
        return Out(hidden, attn, cache)
    if kind == "dict":
        return {"hidden": hidden, "attn": attn, "cache": cache}
    return LayerOutput(hidden, attn, cache)


def unpack(out: Any) -> tuple[Tensor, Any, Any]:
    if isinstance(out, dict):
        return out["hidden"], out["attn"], out["cache"]
    if isinstance(out, LayerOutput):
        return out.hidden, out.attn, out.cache
    return out[0], out[1], out[2]


class LegacyLayer(nn.Module):
    """Called like a transformers 4.x layer: hidden states, a mask, a cache, a flag; returns a structure."""

    def __init__(self, index: int, kind: str) -> None:
        super().__init__()
        self.index, self.kind = index, kind
        self.fc = nn.Linear(8, 8)

    def forward(self, hidden_states, attention_mask=None, cache=None, output_attentions=False):  # type: ignore[no-untyped-def]
        attn = torch.softmax(hidden_states @ hidden_states.transpose(-1, -2), -1)
        cache.seen.append(self.index)
        return pack(self.kind, hidden_states + torch.tanh(self.fc(hidden_states)) * attention_mask, attn, cache)


class LegacyStack(PartialBackpropMixin, L.LightningModule):
    """embed (Linear 4->8) -> layers.0..2 (LegacyLayer) -> head (Linear 8->2); records what each layer returned."""

    def __init__(self, kind: str = "tuple", by_keyword: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(LegacyLayer(i, kind) for i in range(3))
        self.head = nn.Linear(8, 2)
        self.by_keyword = by_keyword
        self.seen: list[list[int]] = []
        self.attn_none: list[list[bool]] = []

    @override
    def forward(self, x: Tensor, skip: frozenset[int] = frozenset()) -> Tensor:
        h, cache, mask = self.embed(x)[:, None], Memory(), torch.ones(1)
        nones = []
        for i, layer in enumerate(self.layers):
            if i in skip:  # the hand-written reference: leave the layer out
                nones.append(True)
                continue
            if self.by_keyword:
                out = layer(hidden_states=h, attention_mask=mask, cache=cache, output_attentions=True)
            else:
                out = layer(h, mask, cache=cache, output_attentions=True)
            h, attn, returned = unpack(out)
            assert returned is cache
            nones.append(attn is None)
        self.seen.append(cache.seen)
        self.attn_none.append(nones)
        return self.head(h[:, 0])

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def reference(kind: str, steps: int, skips: list[frozenset[int]]) -> LegacyStack:
    """Plain PyTorch: the same model trained with the given layers left out at each step."""
    torch.manual_seed(0)
    ref = LegacyStack(kind)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    batches = list(tiny_loader())
    for step in range(steps):
        x, y = batches[step % len(batches)]
        F.mse_loss(ref(x, skips[step]), y).backward()
        opt.step()
        opt.zero_grad()
    return ref


@pytest.mark.parametrize("kind", ["tuple", "namedtuple", "dict", "dataclass"])
def test_structure_learned_in_the_sanity_check_skips_like_a_hand_written_loop(kind: str) -> None:
    torch.manual_seed(0)
    model = LegacyStack(kind)
    trainer = quiet_trainer(max_steps=3, num_sanity_val_steps=1, callbacks=[ConditionalSkip({"layers.1": "always"})])
    trainer.fit(model, tiny_loader(), tiny_loader())
    assert model.seen[0] == [0, 1, 2]  # the sanity check ran every layer: that is where the structure came from
    assert model.seen[1:] == [[0, 2]] * 3  # training steps: layer 1 never ran, and the cache was left untouched
    assert model.attn_none[1:] == [[False, True, False]] * 3  # a skipped layer has no attention weights
    assert_states_bitwise_equal(model.state_dict(), reference(kind, 3, [frozenset({1})] * 3).state_dict())


def test_layers_of_one_class_share_the_structure_so_a_first_call_can_be_skipped() -> None:
    torch.manual_seed(0)
    model = LegacyStack()
    skip = ConditionalSkip({"layers.[12]": {"steps": [0, 1]}})  # skipped at their first call, no sanity check
    quiet_trainer(max_steps=2, callbacks=[skip]).fit(model, tiny_loader())
    assert model.seen == [[0], [0, 1, 2]]
    ref = reference("tuple", 2, [frozenset({1, 2}), frozenset()])
    assert_states_bitwise_equal(model.state_dict(), ref.state_dict())


def test_hidden_states_passed_by_keyword_are_returned() -> None:
    torch.manual_seed(0)
    model = LegacyStack(by_keyword=True)
    skip = ConditionalSkip({"layers.2": {"steps": [1, None]}})
    quiet_trainer(max_steps=3, callbacks=[skip]).fit(model, tiny_loader())
    assert model.seen == [[0, 1, 2], [0, 1], [0, 1]]
    ref = reference("tuple", 3, [frozenset(), frozenset({2}), frozenset({2})])
    assert_states_bitwise_equal(model.state_dict(), ref.state_dict())


def test_first_call_of_an_unknown_structure_is_refused_naming_the_module_and_fix() -> None:
    skip = ConditionalSkip({"layers.0": "always"})
    match = r"cannot skip module 'layers.0' \(LegacyLayer\) at its first call"
    with pytest.raises(IncompatibleModuleError, match=match):
        quiet_trainer(max_steps=1, callbacks=[skip]).fit(LegacyStack(), tiny_loader())
    assert "forward" not in LegacyStack().layers[0].__dict__


class TupleBlock(nn.Module):
    """A one-argument block without annotation that returns ``(hidden, aux)``: the residual assumption is wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return x + self.fc(x), x.sum()


class TupleBlockModel(LegacyStack):
    def __init__(self) -> None:
        super().__init__()
        self.block = TupleBlock()

    @override
    def forward(self, x: Tensor, skip: frozenset[int] = frozenset()) -> Tensor:
        out = self.block(self.embed(x))
        return self.head(out[0] if isinstance(out, tuple) else out)


def test_a_wrong_residual_assumption_stops_at_the_first_call_that_runs() -> None:
    skip = ConditionalSkip({"block": {"steps": [0, 1]}})
    with pytest.raises(IncompatibleModuleError, match=r"skipped module 'block' .* before any had run, assuming"):
        quiet_trainer(max_steps=2, callbacks=[skip]).fit(TupleBlockModel(), tiny_loader())


class NoHidden(nn.Module):
    def forward(self, x: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        return x.sum(-1), x.mean(-1)


class NoHiddenModel(TupleBlockModel):
    def __init__(self, by_keyword: bool = False) -> None:
        super().__init__()
        self.block, self.kw = NoHidden(), by_keyword  # type: ignore[assignment]

    @override
    def forward(self, x: Tensor, skip: frozenset[int] = frozenset()) -> Tensor:
        h = self.embed(x)
        out = self.block(x=h, scale=2.0) if self.kw else self.block(h, scale=2.0)
        return self.head(h + out[0][:, None])


@pytest.mark.parametrize(
    ("by_keyword", "match"),
    [
        (False, r"'block': its output tuple \(\(8,\), \(8,\)\) holds no tensor of its input's shape"),
        (True, r"'block': it is called with keyword arguments only \(\['scale', 'x'\]\) and none is named"),
    ],
)
def test_outputs_that_cannot_be_matched_name_the_module_and_what_it_returned(by_keyword: bool, match: str) -> None:
    skip = ConditionalSkip({"block": {"steps": [1, 2]}})
    with pytest.raises(IncompatibleModuleError, match=match):
        quiet_trainer(max_steps=2, callbacks=[skip]).fit(NoHiddenModel(by_keyword), tiny_loader())


@pytest.mark.parametrize("kind", ["tuple", "namedtuple", "dict", "dataclass"])
def test_layout_rebuilds_each_structure_with_the_input_and_the_cache_passed_now(kind: str) -> None:
    x, mask, first, now = torch.randn(2, 1, 8), torch.ones(1), Memory(), Memory()
    out = pack(kind, x * 2, torch.ones(2, 1, 1), first)
    layout = learn_layout("layer", x, (x, mask), {"cache": first}, out)
    y = torch.randn(2, 1, 8)
    hidden, attn, cache = unpack(skipped_output(layout, y, (y, mask), {"cache": now}))
    assert hidden is y and attn is None and cache is now
    assert not any(t.device.type != "meta" for t in layout.markers)  # the layout holds no real tensor


def test_per_sample_skip_mixes_rows_of_the_hidden_state_only() -> None:
    x, cache = torch.randn(4, 1, 8), Memory()
    out = (x + 1, torch.ones(4, 1, 1), cache)
    layout = learn_layout("layer", x, (x,), {"cache": cache}, out)
    rows = torch.tensor([True, False, True, False])
    hidden, attn, returned = mix_rows(layout, x, out, rows, (x,), {"cache": cache})
    assert torch.equal(hidden, torch.where(rows[:, None, None], x, x + 1))
    assert attn is out[1] and returned is cache


def test_per_sample_rule_on_tuple_outputs_matches_reference_rows() -> None:
    rule = {"when": {"probability": 0.5, "seed": 1}, "per_sample": True}
    torch.manual_seed(0)
    model = LegacyStack()
    quiet_trainer(max_steps=1, callbacks=[ConditionalSkip({"layers.1": rule})]).fit(model, tiny_loader())
    rows = Probability(0.5, 1).per_sample(StepContext(), 8, salt="layers.1")
    assert 0 < int(rows.sum()) < 8
    torch.manual_seed(0)
    ref = LegacyStack()
    x, y = next(iter(tiny_loader()))
    h, mask, cache = ref.embed(x)[:, None], torch.ones(1), Memory()
    h = ref.layers[0](h, mask, cache=cache)[0]
    h = torch.where(rows[:, None, None], h, ref.layers[1](h, mask, cache=cache)[0])
    h = ref.layers[2](h, mask, cache=cache)[0]
    F.mse_loss(ref.head(h[:, 0]), y).backward()
    torch.optim.SGD(ref.parameters(), lr=0.1).step()
    assert_states_bitwise_equal(model.state_dict(), ref.state_dict())


class RngProbe(Callback):
    """The global RNG state at the start of each training batch and right before backward (after forward)."""

    def __init__(self) -> None:
        self.states: list[tuple[Tensor, Tensor]] = []

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._start = torch.get_rng_state()

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self.states.append((self._start, torch.get_rng_state()))


def test_block_skipped_at_its_first_step_leaves_batchnorm_statistics_and_rng_untouched() -> None:
    torch.manual_seed(0)
    model = ResNetModule()
    block = model.net.layer2[1]
    block.drop = nn.Dropout(0.5)  # the model's only random draw, and only if this block runs
    before = {k: v.clone() for k, v in block.state_dict().items()}
    probe = RngProbe()
    skip = ConditionalSkip({"net.layer2.1": {"steps": [0, 1]}})  # skipped at its very first call, no sanity check
    quiet_trainer(max_steps=2, callbacks=[skip, probe]).fit(model, image_loader())
    (start0, after0), (start1, after1) = probe.states
    assert torch.equal(start0, after0)  # step 0: no dropout draw, the block's forward never ran
    assert not torch.equal(start1, after1)  # step 1 (control): it ran and drew
    assert int(block.bn1.num_batches_tracked) == 1  # updated once, at step 1 only
    torch.manual_seed(0)
    ref = ResNetModule()  # hand-written: step 0 without the block, step 1 with it
    ref.net.layer2[1].drop = nn.Dropout(0.5)
    assert_states_bitwise_equal(ref.net.layer2[1].state_dict(), before)
    opt = torch.optim.SGD(ref.parameters(), lr=ref.lr)
    for (x, y), skipped in zip(image_loader(), [frozenset({"layer2.1"}), frozenset()], strict=False):
        F.cross_entropy(ref.net(x, skipped), y).backward()
        opt.step()
        opt.zero_grad()
    assert_states_bitwise_equal(model.state_dict(), ref.state_dict())  # BatchNorm buffers included


def test_resnet_stochastic_depth_equals_a_hand_written_loop() -> None:
    blocks = ["net.layer1.0", "net.layer1.1", "net.layer2.1"]  # layer2.0 downsamples: not skippable
    depth = StochasticDepth(blocks=blocks, drop_rate=0.6, seed=3)
    torch.manual_seed(0)
    model = ResNetModule(dropout=0.2)
    quiet_trainer(max_steps=6, callbacks=[depth]).fit(model, image_loader(n=24))  # one epoch: one loader RNG draw
    rates = dict(zip(blocks, [0.2, 0.4, 0.6], strict=True))
    torch.manual_seed(0)
    ref = ResNetModule(dropout=0.2)
    opt = torch.optim.SGD(ref.parameters(), lr=ref.lr)
    batches = list(image_loader(n=24))
    skipped_any = set()
    for step in range(6):
        x, y = batches[step % len(batches)]
        ctx = StepContext(global_step=step, batch_idx=step % len(batches))
        skip = frozenset(b[4:] for b in blocks if Probability(rates[b], 3)(ctx, salt=b))
        skipped_any |= skip
        F.cross_entropy(ref.net(x, skip), y).backward()
        opt.step()
        opt.zero_grad()
    assert skipped_any  # the draws did skip something
    assert_states_bitwise_equal(model.state_dict(), ref.state_dict())


def test_downsampling_block_is_named_at_its_first_call() -> None:
    skip = ConditionalSkip({"net.layer2.0": {"steps": [1, 2]}})
    match = r"'net.layer2.0': its output \(4, 16, 4, 4\) differs from its input"
    with pytest.raises(IncompatibleModuleError, match=match):
        quiet_trainer(max_steps=1, callbacks=[skip]).fit(ResNetModule(), image_loader())
