"""ActivationMemoryMonitor against counts computed by hand and by an independent tracker."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lit_partial import ActivationDetach, ActivationMemoryMonitor
from lit_partial.functional import saved_activation_bytes
from tests.helpers import quiet_trainer
from tests.helpers.activation_models import UNIT, B, FFNModule, N, SeqRNN, W, ffn_loader, seq_loader

pytestmark = pytest.mark.filterwarnings("ignore:.*validation_step.*")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_steps": 0}, "`every_n_steps` must be a positive int, got 0"),
        ({"every_n_steps": 1.5}, "got 1.5"),
        ({"name": ""}, "`name` must be a non-empty metric name"),
    ],
)
def test_init_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ActivationMemoryMonitor(**kwargs)


class _Independent(Callback):
    """Recounts, in on_before_backward, the saved bytes by walking the graph of the loss by hand."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: torch.Tensor) -> None:
        seen, storages, stack = set(), {}, [loss.grad_fn]
        params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            for attr in dir(node):
                if attr.startswith("_saved_"):
                    value = getattr(node, attr)
                    for t in value if isinstance(value, tuple) else (value,):
                        # 0-dim: Python numbers autograd wraps (Lightning's `loss / 1`), which bypass saved-tensor
                        # hooks; the FFN model saves no other scalars
                        if not isinstance(t, torch.Tensor) or t.dim() == 0:
                            continue
                        if t.untyped_storage().data_ptr() not in params:
                            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            stack.extend(next_fn for next_fn, _ in node.next_functions)
        self.counts.append(sum(storages.values()))


def test_logged_bytes_equal_a_hand_count_and_an_independent_graph_walk() -> None:
    monitor, walk = ActivationMemoryMonitor(), _Independent()
    trainer = quiet_trainer(max_steps=3, callbacks=[monitor, walk], limit_val_batches=0)
    trainer.fit(FFNModule(), ffn_loader())
    # per block: input and ReLU output; the loss's pow keeps (out - y)
    assert list(monitor.history) == walk.counts == [(2 * N + 1) * UNIT] * 3
    assert trainer.callback_metrics["saved_activation_bytes"].item() == (2 * N + 1) * UNIT
    assert "max_memory_allocated_bytes" not in trainer.callback_metrics  # CPU run
    assert monitor._tracker is None  # hooks popped after every batch


def test_every_n_steps_and_custom_name() -> None:
    monitor = ActivationMemoryMonitor(every_n_steps=2, name="act_bytes", prog_bar=True)
    trainer = quiet_trainer(max_steps=4, callbacks=[monitor], limit_val_batches=0)
    trainer.fit(FFNModule(), ffn_loader())
    assert len(monitor.history) == 2
    assert "act_bytes" in trainer.callback_metrics


def test_monitor_shows_the_checkpoint_saving() -> None:
    plain, ckpt = ActivationMemoryMonitor(), ActivationMemoryMonitor()
    quiet_trainer(max_steps=1, callbacks=[plain], limit_val_batches=0).fit(FFNModule(), ffn_loader())
    callbacks = [ActivationDetach(checkpoint="net.blocks.*"), ckpt]
    quiet_trainer(max_steps=1, callbacks=callbacks, limit_val_batches=0).fit(FFNModule(), ffn_loader())
    assert plain.history[0] - ckpt.history[0] == N * UNIT  # the ReLU outputs are recomputed instead of kept


def test_monitor_matches_functional_count() -> None:
    model, x, y = FFNModule(), torch.randn(B, W), torch.randn(B, W)
    expected = saved_activation_bytes(lambda: model.training_step((x, y), 0), exclude=model)
    monitor = ActivationMemoryMonitor()
    quiet_trainer(max_steps=1, callbacks=[monitor], limit_val_batches=0).fit(FFNModule(), ffn_loader())
    assert monitor.history[0] == expected


@pytest.mark.parametrize(("k", "steps_kept"), [(2, 2), (3, 3), (None, 6)])
def test_tbptt_logs_the_largest_chunk_once_per_batch(k: int | None, steps_kept: int) -> None:
    monitor = ActivationMemoryMonitor()
    quiet_trainer(max_epochs=1, callbacks=[monitor], limit_val_batches=0).fit(SeqRNN(k=k), seq_loader(steps=6))
    # B=2, T=6, F=3, H=5: the batch x (its views are the input Linear's saved inputs), the incoming state,
    # then per step kept: the tanh output and the loss's diff
    batch, state, per_step = 2 * 6 * 3 * 4, 2 * 5 * 4, 2 * 5 * 4 + 2 * 4
    assert list(monitor.history) == [batch + state + steps_kept * per_step] * 2  # 2 batches


def test_two_monitors_measuring_the_same_steps_see_the_same_bytes() -> None:
    # The main job's cost report measures with its own tracker inside the monitor's: neither may hide the other.
    every, second = ActivationMemoryMonitor(), ActivationMemoryMonitor(name="other", every_n_steps=2)
    quiet_trainer(max_steps=4, callbacks=[every, second], limit_val_batches=0).fit(FFNModule(), ffn_loader())
    assert list(every.history) == [(2 * N + 1) * UNIT] * 4  # as measured alone (the test above)
    assert list(second.history) == [(2 * N + 1) * UNIT] * 2


def test_the_former_activation_memory_module_still_gives_the_monitor() -> None:
    import lit_partial.callbacks.activation_memory as former
    from lit_partial import ActivationMemoryMonitor

    with pytest.warns(DeprecationWarning, match=r"activation_memory is deprecated; .*_monitor"):
        assert former.ActivationMemoryMonitor is ActivationMemoryMonitor
