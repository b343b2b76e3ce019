"""Truncated BPTT: chunking, hand-written chunked loops as references, memory that grows with k, not T."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_partial.demos import DigitsDataModule, DigitsRNN
from lit_partial.functional import SavedTensorTracker
from lit_partial.tbptt import detach_hiddens, split_along_time, truncated_bptt
from tests.helpers import assert_states_bitwise_equal, quiet_trainer
from tests.helpers.activation_models import SeqRNN, params, seq_loader

pytestmark = pytest.mark.filterwarnings("ignore:.*validation_step.*")


def test_split_along_time_splits_sequences_and_passes_the_rest() -> None:
    x, y, label = torch.randn(2, 7, 3), torch.randn(2, 7), torch.tensor([1, 2])
    chunks = split_along_time({"x": x, "y": y, "label": label, "name": "a"}, k=3)
    assert [c["x"].shape[1] for c in chunks] == [3, 3, 1]
    assert torch.equal(torch.cat([c["y"] for c in chunks], 1), y)
    assert all(c["label"] is label and c["name"] == "a" for c in chunks)
    assert len(split_along_time((x,), k=10)) == 1
    assert [c[0].shape[0] for c in split_along_time([torch.randn(5, 2)], k=2, time_dim=0)] == [2, 2, 1]


@pytest.mark.parametrize(("k", "match"), [(0, "got 0"), (1.5, "got 1.5"), ("2", "got '2'")])
def test_split_rejects_bad_k(k: object, match: str) -> None:
    with pytest.raises(ValueError, match=f"positive int.*{match}"):
        split_along_time(torch.randn(2, 4, 1), k)  # type: ignore[arg-type]


def test_split_needs_a_time_dimension() -> None:
    with pytest.raises(ValueError, match=r"no tensor with a time dimension 2.*Fix: pass `time_dim="):
        split_along_time((torch.randn(2, 4), "text"), 2, time_dim=2)


def test_step_fn_must_return_a_pair() -> None:
    with pytest.raises(TypeError, match=r"must return \(loss, hiddens\), got Tensor"):
        truncated_bptt(torch.randn(1, 2, 1), 1, lambda chunk, h: chunk.sum())


def test_detach_hiddens_keeps_structure() -> None:
    h = (torch.randn(1, requires_grad=True) * 2, [torch.ones(1)], {"c": torch.randn(1, requires_grad=True) * 3})
    out = detach_hiddens(h)
    assert not out[0].requires_grad and isinstance(out[1], list) and not out[2]["c"].requires_grad


def _hand_chunked(model: SeqRNN, loader: object, k: int, accumulate: bool, clip: float | None = None) -> None:
    """What Lightning 1.x did with truncated_bptt_steps=k, written out with plain PyTorch."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in loader:  # type: ignore[attr-defined]
        h, starts = None, range(0, x.shape[1], k)
        for start in starts:
            loss, h = model.chunk_step((x[:, start : start + k], y[:, start : start + k]), h)
            (loss / len(starts) if accumulate else loss).backward()
            h = h.detach()
            if not accumulate:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                opt.step()
                opt.zero_grad()
        if accumulate:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize(("accumulate", "clip"), [(False, None), (True, None), (False, 0.05)])
def test_lightning_tbptt_equals_a_hand_written_chunked_loop(accumulate: bool, clip: float | None) -> None:
    hand = SeqRNN(k=2, accumulate=accumulate)
    _hand_chunked(hand, seq_loader(steps=5), k=2, accumulate=accumulate, clip=clip)
    ours = SeqRNN(k=2, accumulate=accumulate, clip=clip)
    trainer = quiet_trainer(max_epochs=1, limit_val_batches=0)
    trainer.fit(ours, seq_loader(steps=5))
    assert_states_bitwise_equal(params(ours), params(hand))
    assert trainer.global_step == (2 if accumulate else 2 * 3)  # 2 batches of 3 chunks (2 + 2 + 1 steps)


def test_full_sequence_k_equals_plain_backprop_through_time() -> None:
    ours, plain = SeqRNN(k=6), SeqRNN(k=None)
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(ours, seq_loader(steps=6))
    quiet_trainer(max_epochs=1, limit_val_batches=0).fit(plain, seq_loader(steps=6))
    assert_states_bitwise_equal(params(ours), params(plain))


def _peak_saved_bytes(k: int, steps: int) -> int:
    model, peaks = SeqRNN(k=k), []
    x, y = torch.randn(2, steps, 3), torch.randn(2, steps)
    # the batch is data, not activations: its storage (which chunk views keep alive) does not count
    with SavedTensorTracker(exclude=[model, x, y]) as tracker:

        def backward(loss: torch.Tensor) -> None:
            peaks.append(tracker.live_bytes())
            loss.backward()

        truncated_bptt((x, y), k, model.chunk_step, backward=backward)
    return max(peaks)


def test_saved_bytes_grow_with_k_not_with_t() -> None:
    # B=2, H=5: the incoming state (kept by `rec`) once, then per step the tanh output and the loss's diff
    state, per_step = 2 * 5 * 4, 2 * 5 * 4 + 2 * 4
    for k in (1, 2, 4):
        assert _peak_saved_bytes(k, 8) == _peak_saved_bytes(k, 32) == state + k * per_step
    assert _peak_saved_bytes(32, 32) == state + 32 * per_step  # full BPTT grows with T


def test_bad_clip_value() -> None:
    with pytest.raises(ValueError, match="`gradient_clip_val` must be a positive number or None, got -1"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(SeqRNN(clip=-1), seq_loader())


def test_errors_under_automatic_optimization_and_several_optimizers() -> None:
    model = SeqRNN(k=2)
    model.automatic_optimization = True
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(model, seq_loader())

    class TwoOpts(SeqRNN):
        def configure_optimizers(self) -> list[torch.optim.Optimizer]:
            return [torch.optim.SGD(self.inp.parameters(), lr=0.1), torch.optim.SGD(self.out.parameters(), lr=0.1)]

    with pytest.raises(RuntimeError, match="configure_optimizers returned 2"):
        quiet_trainer(max_steps=1, limit_val_batches=0).fit(TwoOpts(), seq_loader())


def test_digits_rnn_trains_with_tbptt_and_validates() -> None:
    torch.manual_seed(0)
    model = DigitsRNN(hidden_size=16, tbptt_steps=4)
    before = copy.deepcopy(model.rnn.weight_ih_l0)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, DigitsDataModule(batch_size=32, sequence=True))
    assert trainer.global_step == 4  # 2 batches x 2 chunks of 4 rows
    assert not torch.equal(before, model.rnn.weight_ih_l0)
    assert {"train_loss", "val_acc"} <= set(trainer.callback_metrics)
    with pytest.raises(ValueError, match="`tbptt_steps` must be a positive int or None"):
        DigitsRNN(tbptt_steps=0)
