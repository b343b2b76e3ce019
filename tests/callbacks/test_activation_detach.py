"""ActivationDetach in Lightning against hand-written references: bytes, parameters, validation untouched."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import Tensor, nn

from lit_partial import ActivationDetach, ActivationMemoryMonitor, ConditionError, SelectorError
from lit_partial.demos import DigitsClassifier, DigitsDataModule
from lit_partial.functional import UnsafeCheckpointError, activation_cuts
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.helpers.acted import RecomputeRecorder, inner_modules
from tests.helpers.activation_models import UNIT, FFNModule, N, ffn_loader, params

pytestmark = pytest.mark.filterwarnings("ignore:.*validation_step.*")


def _fit(model: L.LightningModule, callbacks: list, steps: int = 3, **kw: object) -> L.Trainer:
    kw.setdefault("limit_val_batches", 0)
    trainer = quiet_trainer(max_steps=steps, callbacks=callbacks, **kw)
    trainer.fit(model, ffn_loader(), ffn_loader(1))
    return trainer


@pytest.mark.parametrize(
    ("kwargs", "match", "error"),
    [
        ({}, "needs at least one of `at`, `checkpoint`, `offload`", ValueError),
        ({"at": {}}, "`at` is an empty dict", ValueError),
        ({"checkpoint": "a", "segments": 0}, "positive int, 'sqrt' or None, got 0", ValueError),
        ({"checkpoint": "a", "segments": "half"}, "got 'half'", ValueError),
        ({"at": "a", "segments": 2}, "applies to `checkpoint`, which is not set", ValueError),
        ({"at": {"a": {"epochz": [0, 1]}}}, "epochz", ConditionError),
        ({"at": 3}, "`at` must be a string or a list of strings", SelectorError),
        ({"checkpoint": [""]}, "`checkpoint` holds ''", SelectorError),
        ({"offload": []}, "`offload` is an empty list", SelectorError),
    ],
)
def test_init_validation(kwargs: dict, match: str, error: type[Exception]) -> None:
    with pytest.raises(error, match=match):
        ActivationDetach(**kwargs)


@pytest.mark.parametrize("argument", ["at", "checkpoint", "offload"])
def test_unknown_selector_fails_at_setup_naming_close_names(argument: str) -> None:
    with pytest.raises(SelectorError, match=r"'net.blocks.9'.*did you mean.*net.blocks"):
        _fit(FFNModule(), [ActivationDetach(**{argument: "net.blocks.9"})])


def test_at_equals_hand_written_detach_in_bytes_and_parameters() -> None:
    hand, hand_monitor = FFNModule(hand_detach=1), ActivationMemoryMonitor()
    _fit(hand, [hand_monitor])
    ours, monitor = FFNModule(), ActivationMemoryMonitor()
    cb = ActivationDetach(at="net.blocks.1")
    _fit(ours, [cb, monitor])
    assert list(monitor.history) == list(hand_monitor.history) == [(2 * (N - 2) + 1) * UNIT] * 3
    assert_states_bitwise_equal(params(ours), params(hand))
    assert not ours.net.blocks[1]._forward_hooks  # removed at teardown


def test_at_under_a_condition_equals_hand_written_window() -> None:
    hand = FFNModule(hand_detach=2, detach_steps=(1, 2))
    _fit(hand, [])
    ours = FFNModule()
    _fit(ours, [ActivationDetach(at={"net.blocks.2": {"steps": [1, 2]}})])
    assert_states_bitwise_equal(params(ours), params(hand))


def test_checkpoint_acts_in_training_steps_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = activation_cuts._checkpointed
    monkeypatch.setattr(activation_cuts, "_checkpointed", lambda *a, **k: calls.append(1) or original(*a, **k))
    plain, ours = FFNModule(), FFNModule()
    _fit(plain, [], limit_val_batches=1, val_check_interval=1)
    monitor = ActivationMemoryMonitor()
    _fit(ours, [ActivationDetach(checkpoint="net.blocks.*"), monitor], limit_val_batches=1, val_check_interval=1)
    assert len(calls) == 3 * N  # 3 training steps x N blocks; the 3 validation runs call none
    assert_states_bitwise_equal(params(ours), params(plain))
    assert list(monitor.history) == [(N + 1) * UNIT] * 3  # block inputs + the loss's (out - y)
    assert all("forward" not in m.__dict__ for m in ours.modules())
    ours.net(torch.randn(2, 16)).sum().backward()  # after teardown the model is plain again
    assert len(calls) == 3 * N


def test_checkpointed_digits_cnn_trains_bit_identically_with_batchnorm_and_dropout() -> None:
    def run(callbacks: list) -> DigitsClassifier:
        L.seed_everything(0, verbose=False)
        model = DigitsClassifier(channels=(8, 16), dropout=0.5)
        quiet_trainer(max_steps=2, callbacks=callbacks, limit_val_batches=0).fit(model, DigitsDataModule(batch_size=16))
        return model

    plain_monitor, monitor, recomputed = ActivationMemoryMonitor(), ActivationMemoryMonitor(), RecomputeRecorder()
    plain = run([plain_monitor])
    ours = run([ActivationDetach(checkpoint=["backbone.*", "head"]), monitor, recomputed])
    assert_states_bitwise_equal(params(ours), params(plain))  # running stats too: updated once per step, not twice
    # it acted: backward recomputed the conv blocks and the head (pooling and flatten have no children), keeping less
    checkpointed = ["backbone.0", "backbone.1", "backbone.2", "backbone.3", "head"]
    assert recomputed.per_backward == [inner_modules(ours, checkpointed)] * 2
    assert all(a < b for a, b in zip(monitor.history, plain_monitor.history, strict=True))


def test_segments_checkpoint_sequential_pieces() -> None:
    monitor = ActivationMemoryMonitor()
    _fit(FFNModule(), [ActivationDetach(checkpoint="net.blocks", segments="sqrt"), monitor], steps=1)
    assert list(monitor.history) == [(2 + 1) * UNIT]  # round(sqrt(4)) = 2 pieces keep their inputs


def test_segments_need_a_sequential() -> None:
    with pytest.raises(ValueError, match=r"not nn.Sequential: 'net.blocks.0' \(FFNBlock\)"):
        _fit(FFNModule(), [ActivationDetach(checkpoint="net.blocks.0", segments=2)])


def test_inplace_module_is_refused_by_name() -> None:
    class InPlace(FFNModule):
        def forward(self, x: Tensor) -> Tensor:  # the input of `pre` needs a gradient, so `pre` is checkpointed
            return self.net(self.pre(x * self.scale))

        def __init__(self) -> None:
            super().__init__()
            self.pre, self.scale = nn.ReLU(inplace=True), nn.Parameter(torch.ones(()))

    with pytest.raises(UnsafeCheckpointError, match=r"'pre' \(ReLU\) modified its input in place"):
        _fit(InPlace(), [ActivationDetach(checkpoint="pre")])


def test_offload_on_cpu_warns_and_does_nothing() -> None:
    plain, ours = FFNModule(), FFNModule()
    _fit(plain, [])
    with pytest.warns(UserWarning, match="offload does nothing"):
        _fit(ours, [ActivationDetach(offload="net.blocks.0")])
    assert_states_bitwise_equal(params(ours), params(plain))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_at_under_ddp_spawn_keeps_ranks_identical(tmp_path: object) -> None:
    from tests.helpers import SaveParamsPerRank, load_rank_states

    trainer = quiet_trainer(
        max_steps=2,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[ActivationDetach(at="net.blocks.1"), SaveParamsPerRank(tmp_path)],
    )
    trainer.fit(FFNModule(), ffn_loader())  # plain DDP would raise: blocks 0-1 get no gradient
    rank0, rank1 = load_rank_states(tmp_path)
    assert_states_bitwise_equal(rank0, rank1)
    assert torch.equal(rank0["net.blocks.0.fc1.weight"], FFNModule().net.blocks[0].fc1.weight)


@pytest.mark.parametrize(("threshold", "reference"), [(1e9, None), (-1e9, 1)])
def test_at_under_a_statistic_condition(threshold: float, reference: int | None) -> None:
    hand = FFNModule(hand_detach=reference)
    _fit(hand, [])
    ours = FFNModule()
    _fit(ours, [ActivationDetach(at={"net.blocks.1": {"stat": "abs_mean", "op": ">", "value": threshold}})])
    assert_states_bitwise_equal(params(ours), params(hand))
