from __future__ import annotations

import pytest
import torch

from benchmarks._noise import flip_labels, imbalanced_indices
from lit_partial.errors import ConfigurationError


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4, 1.0])
def test_flip_labels_flips_exactly_the_fraction_each_to_another_class(fraction: float) -> None:
    labels = torch.arange(10).repeat(144)[:1437]  # the digits training split's size
    noisy, flipped = flip_labels(labels, fraction, num_classes=10, seed=3)
    assert int(flipped.sum()) == round(fraction * 1437) == int((noisy != labels).sum())
    assert torch.equal(noisy[~flipped], labels[~flipped])
    assert ((noisy >= 0) & (noisy < 10)).all() and torch.equal(labels, torch.arange(10).repeat(144)[:1437])


def test_flip_labels_depends_on_its_seed_only() -> None:
    labels = torch.randint(0, 10, (500,), generator=torch.Generator().manual_seed(0))
    a = flip_labels(labels, 0.3, num_classes=10, seed=1)
    torch.manual_seed(123)  # the global RNG plays no part
    b = flip_labels(labels, 0.3, num_classes=10, seed=1)
    c = flip_labels(labels, 0.3, num_classes=10, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    shifts = (a[0] - labels)[a[1]] % 10
    assert set(shifts.tolist()) == set(range(1, 10))  # every other class is drawn


def test_imbalanced_indices_keep_exact_counts_per_class() -> None:
    labels = torch.arange(10).repeat(20)
    index = imbalanced_indices(labels, {5: 0.1, 6: 0.25, 7: 0.0}, seed=0)
    counts = torch.bincount(labels[index], minlength=10).tolist()
    assert counts == [20, 20, 20, 20, 20, 2, 5, 0, 20, 20]
    assert torch.equal(index, torch.sort(index).values)
    assert torch.equal(index, imbalanced_indices(labels, {5: 0.1, 6: 0.25, 7: 0.0}, seed=0))
    repeated = imbalanced_indices(labels, {0: 2.5}, seed=0)  # every class-0 sample twice, half of them thrice
    per_sample = torch.bincount(repeated, minlength=200)[labels == 0]
    assert len(repeated) == 50 + 9 * 20 and sorted(per_sample.tolist()) == [2] * 10 + [3] * 10


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda y: flip_labels(y, 1.5), r"`fraction` must be in \[0, 1\], got 1.5"),
        (lambda y: flip_labels(y.float(), 0.1), "1-d integer tensor"),
        (lambda y: flip_labels(y, 0.1, num_classes=3), r"num_classes=3 and labels in \[0, 9\].*Fix: pass num_classes"),
        (lambda y: flip_labels(y, 0.1, seed=1.5), "`seed` must be an integer"),
        (lambda y: imbalanced_indices(y, {1: -0.1}), r"keep\[1\] must be a number >= 0, got -0.1; e.g. 0.1"),
    ],
)
def test_errors_name_the_value_and_the_fix(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigurationError, match=match):
        call(torch.arange(10))
