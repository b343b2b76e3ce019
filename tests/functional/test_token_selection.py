"""Token scoring and top-k selection (Rho-1) against hand-written references."""

from __future__ import annotations

import pytest
import torch

from lit_partial.errors import ConfigurationError
from lit_partial.functional.token_selection import (
    masked_token_mean,
    num_kept_tokens,
    select_tokens,
    token_losses,
    token_scores,
)


def hand_topk(scores: torch.Tensor, valid: torch.Tensor, keep: float) -> torch.Tensor:
    """Top round(keep * n_valid) valid tokens by score, ties to the lower flat index, written with Python sorting."""
    flat, ok = scores.reshape(-1).tolist(), valid.reshape(-1).tolist()
    candidates = [i for i in range(len(flat)) if ok[i]]
    k = min(len(candidates), max(1, round(keep * len(candidates)))) if candidates else 0
    chosen = sorted(candidates, key=lambda i: (-flat[i], i))[:k]
    mask = torch.zeros(len(flat), dtype=torch.bool)
    mask[chosen] = True
    return mask.view(scores.shape)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.6, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kept_set_equals_hand_topk_over_valid_tokens(keep: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(4, 9, generator=gen)
    scores[0, :3] = scores[0, 3]  # ties
    valid = torch.rand(4, 9, generator=gen) > 0.3
    valid[2] = False  # a fully padded row
    kept = select_tokens(scores, valid, keep)
    assert torch.equal(kept, hand_topk(scores, valid, keep))
    assert not (kept & ~valid).any()


def test_invalid_tokens_never_kept_even_with_the_highest_scores() -> None:
    scores = torch.tensor([[100.0, 1.0, 2.0, 3.0]])
    valid = torch.tensor([[False, True, True, True]])
    assert select_tokens(scores, valid, 0.34).tolist() == [[False, False, False, True]]
    assert not select_tokens(scores, torch.zeros_like(valid), 0.5).any()


def test_num_kept_tokens_rounds_and_keeps_at_least_one() -> None:
    assert num_kept_tokens(torch.tensor([10, 3, 1, 0]), 0.25).tolist() == [2, 1, 1, 0]
    assert num_kept_tokens(torch.tensor(7), 1.0).item() == 7


def test_masked_mean_gradient_is_the_hand_written_one_and_ignores_nan() -> None:
    w = torch.randn(3, 4, requires_grad=True)
    losses = (w**2).clone()
    losses_nan = losses.clone()
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    losses_nan = torch.where(mask, losses, torch.full_like(losses, float("nan")))
    (grad,) = torch.autograd.grad(masked_token_mean(losses_nan, mask), w)
    expected = torch.where(mask, 2 * w, torch.zeros_like(w)) / mask.sum()
    assert torch.equal(grad, expected.detach())


def test_token_losses_match_hugging_face_causal_lm_loss() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=32, max_position_embeddings=16,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 32, (2, 7))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, 5:] = -100  # padding
    out = model(input_ids=ids, labels=labels)
    losses, valid = token_losses(out.logits, labels)
    assert losses.shape == valid.shape == (2, 6)
    torch.testing.assert_close(masked_token_mean(losses, valid), out.loss)


def test_token_scores_excess_loss() -> None:
    losses, ref = torch.tensor([[3.0, 1.0]]), torch.tensor([[2.5, -1.0]])
    assert token_scores(losses, ref, score="excess_loss").tolist() == [[0.5, 2.0]]
    assert token_scores(losses).tolist() == [[3.0, 1.0]]


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(ConfigurationError, match=r"`keep` must be a fraction in \(0, 1\], got 0"):
        select_tokens(torch.zeros(2), torch.ones(2, dtype=torch.bool), 0)
    with pytest.raises(ConfigurationError, match="must have one shape"):
        select_tokens(torch.zeros(2), torch.ones(3, dtype=torch.bool), 0.5)
    with pytest.raises(ConfigurationError, match="`score` must be one of"):
        token_scores(torch.zeros(2), score="entropy")
    with pytest.raises(ConfigurationError, match="needs reference losses"):
        token_scores(torch.zeros(2), score="excess_loss")
    with pytest.raises(ConfigurationError, match=r"shape of the losses, \(2,\), got \(3,\)"):
        token_scores(torch.zeros(2), torch.zeros(3), score="excess_loss")
    with pytest.raises(ConfigurationError, match=r"logits \(B, T, V\) and labels \(B, T\)"):
        token_losses(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
