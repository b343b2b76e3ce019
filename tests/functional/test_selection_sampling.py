from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from lit_partial.functional.selection_sampling import (
    SamplePool,
    UnsupportedBatchError,
    batch_size_of,
    concat_batches,
    num_kept,
    probability_beta,
    select_outliers,
    select_probability,
    select_topk,
    selection_probabilities,
    slice_batch,
    update_history,
)

Pair = namedtuple("Pair", ["x", "y"])


def test_num_kept_rounds_and_keeps_at_least_one() -> None:
    assert [num_kept(64, k) for k in (0.25, 0.5, 1.0)] == [16, 32, 64]
    assert num_kept(3, 0.01) == 1
    assert num_kept(5, 0.5) == 2  # round half to even, never above B


@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.5, True, "0.5"])
def test_keep_outside_unit_interval_is_rejected(keep: object) -> None:
    with pytest.raises(ValueError, match=r"`keep` must be a fraction in \(0, 1\]"):
        num_kept(8, keep)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep"):
        select_topk(torch.ones(4), keep)  # type: ignore[arg-type]


def test_topk_selects_exactly_the_highest_losses() -> None:
    losses = torch.randperm(20).float()
    index = select_topk(losses, keep=0.25)
    assert index.tolist() == sorted(torch.nonzero(losses >= 15).reshape(-1).tolist())
    assert losses[index].min() > losses[torch.tensor([i for i in range(20) if i not in index.tolist()])].max()


def test_topk_and_outliers_break_ties_by_index() -> None:
    losses = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert select_topk(losses, 0.5).tolist() == [0, 1]
    assert select_outliers(losses, 0.5).tolist() == [0, 1]


def test_outliers_drops_the_highest_losses() -> None:
    losses = torch.tensor([0.3, 9.0, 0.1, 0.2, 7.0, 0.4, 0.5, 0.6])
    assert select_outliers(losses, keep=0.75).tolist() == [0, 2, 3, 5, 6, 7]  # 9.0 and 7.0 left out


def test_loss_vector_must_be_one_dimensional() -> None:
    with pytest.raises(ValueError, match=r"1-D tensor of per-sample losses, got \(2, 2\)"):
        select_topk(torch.ones(2, 2), 0.5)


def test_probability_beta_gives_expected_rate() -> None:
    assert probability_beta(1.0) == 0.0
    assert probability_beta(0.25) == 3.0
    u = torch.linspace(0, 1, 100_001)
    assert abs(u.pow(probability_beta(0.2)).mean().item() - 0.2) < 1e-3


def test_selection_probabilities_are_cdf_to_the_beta() -> None:
    history = torch.tensor([4.0, 1.0, 3.0, 2.0])
    probs = selection_probabilities(torch.tensor([0.5, 1.0, 2.5, 4.0, 9.0]), history, beta=2.0)
    assert torch.allclose(probs, torch.tensor([0.0, 0.25, 0.5, 1.0, 1.0]) ** 2)
    with pytest.raises(ValueError, match="`history` is empty"):
        selection_probabilities(torch.ones(2), torch.empty(0), beta=1.0)


def test_probability_selects_high_losses_far_more_often_at_the_expected_rate() -> None:
    losses = torch.linspace(0.0, 1.0, 100)  # ordering known: sample i has the i-th smallest loss
    counts = torch.zeros(100)
    rounds = 400
    for seed in range(rounds):
        index = select_probability(losses, losses, keep=0.25, generator=torch.Generator().manual_seed(seed))
        counts[index] += 1
    rate = counts.sum().item() / (100 * rounds)
    assert abs(rate - 0.25) < 0.02  # 1 / (beta + 1) with beta = 3
    low, high = counts[:25].mean().item(), counts[75:].mean().item()
    assert high > 10 * low
    assert counts[-1] == rounds  # CDF(max) = 1: the highest loss is always kept


def test_probability_is_reproducible_from_the_generator_alone() -> None:
    losses = torch.rand(50)
    torch.manual_seed(1)
    a = select_probability(losses, losses, 0.5, torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    b = select_probability(losses, losses, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_update_history_is_a_ring_buffer() -> None:
    history = update_history(None, torch.tensor([1.0, 2.0]), size=3)
    history = update_history(history, torch.tensor([3.0, 4.0]), size=3)
    assert history.tolist() == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError, match="`size` must be a positive integer, got 0"):
        update_history(None, torch.ones(1), size=0)


def test_slice_batch_keeps_nested_structure_and_types() -> None:
    x = torch.arange(12).view(4, 3)
    batch = {"x": x, "meta": (torch.arange(4), [torch.arange(4) * 10, Pair(x, torch.arange(4))])}
    out = slice_batch(batch, torch.tensor([3, 1]))
    assert out["x"].tolist() == [[9, 10, 11], [3, 4, 5]]
    assert isinstance(out["meta"], tuple) and isinstance(out["meta"][1], list)
    assert out["meta"][1][0].tolist() == [30, 10]
    assert isinstance(out["meta"][1][1], Pair) and out["meta"][1][1].y.tolist() == [3, 1]
    assert batch_size_of(out) == 2


def test_unsupported_batch_element_names_type_and_place() -> None:
    batch = {"x": torch.zeros(2, 3), "text": ["a", "b"]}
    with pytest.raises(UnsupportedBatchError, match=r"type builtins\.str at batch\['text'\]\[0\]"):
        slice_batch(batch, torch.tensor([0]))
    with pytest.raises(UnsupportedBatchError, match="object"):
        batch_size_of((torch.zeros(2), object()))


def test_batch_size_errors() -> None:
    with pytest.raises(ValueError, match="disagree on the first"):
        batch_size_of((torch.zeros(2), torch.zeros(3)))
    with pytest.raises(ValueError, match="0-d tensor"):
        batch_size_of({"x": torch.zeros(2), "scale": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="holds no tensor"):
        batch_size_of([])


def test_concat_batches_inverts_slicing() -> None:
    batch = (torch.arange(6).view(3, 2), {"y": torch.arange(3)})
    parts = [slice_batch(batch, torch.tensor([0])), slice_batch(batch, torch.tensor([1, 2]))]
    whole = concat_batches(parts)
    assert torch.equal(whole[0], batch[0]) and torch.equal(whole[1]["y"], batch[1]["y"])
    with pytest.raises(ValueError, match="different keys"):
        concat_batches([{"a": torch.ones(1)}, {"b": torch.ones(1)}])
    with pytest.raises(ValueError, match="empty"):
        concat_batches([])


def test_pool_is_fifo_with_capacity() -> None:
    pool = SamplePool(capacity=2)
    pool.add((torch.tensor([0, 1, 2]),), torch.tensor([0.0, 1.0, 2.0]))
    pool.add((torch.tensor([3, 4]),), torch.tensor([3.0, 4.0]))
    batch, losses = pool.take(2)
    assert batch[0].tolist() == [0, 1] and losses.tolist() == [0.0, 1.0]
    assert len(pool) == 2 and pool.dropped == 1  # sample 2 was the oldest beyond capacity
    assert pool.take(2)[0][0].tolist() == [3, 4]
    assert len(pool) == 0
    with pytest.raises(ValueError, match="cannot take 1 samples from a pool of 0"):
        pool.take(1)
    with pytest.raises(ValueError, match="`capacity` must be a positive integer"):
        SamplePool(0)


def test_pool_state_roundtrip() -> None:
    pool = SamplePool(capacity=4)
    pool.add({"x": torch.arange(3)}, torch.tensor([1.0, 2.0, 3.0]))
    other = SamplePool(capacity=4)
    other.load_state_dict(pool.state_dict())
    assert torch.equal(other.take(3)[0]["x"], pool.take(3)[0]["x"])
