"""TokenSelection in Lightning: gradients equal the hand-written masked loss; reference handling; errors."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lit_partial import PartialBackpropMixin, TokenSelection
from lit_partial.errors import ConfigurationError, UsageError
from lit_partial.functional.token_selection import masked_token_mean, select_tokens, token_losses
from tests.helpers.trainers import RecordGrads, quiet_trainer

V, T = 16, 6


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, input_ids: Tensor, **_: Any) -> Tensor:
        return self.head(torch.tanh(self.embed(input_ids)))  # type: ignore[no-any-return]


class LM(PartialBackpropMixin, L.LightningModule):
    def __init__(self, call_token_loss: bool = True) -> None:
        super().__init__()
        self.net, self.call_token_loss = TinyLM(), call_token_loss

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        losses, valid = token_losses(self.net(batch["input_ids"]), batch["labels"])
        if not self.call_token_loss:
            return masked_token_mean(losses, valid)
        return self.token_loss(losses, valid, batch)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches(n: int = 2, with_ref: bool = False) -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (3, T), generator=gen)
        labels = ids.clone()
        labels[0, :2] = -100
        labels[2, 4:] = -100
        item = {"input_ids": ids, "labels": labels}
        if with_ref:
            item["ref_loss"] = torch.rand(3, T - 1, generator=gen) * 3
        out.append(item)
    return out


def fit(cb: TokenSelection | None, data: list[dict[str, Tensor]], model: LM | None = None) -> tuple[LM, RecordGrads]:
    torch.manual_seed(0)
    model = model or LM()
    record = RecordGrads()
    callbacks: list[Any] = [record] + ([cb] if cb is not None else [])
    quiet_trainer(max_steps=len(data), callbacks=callbacks).fit(model, DataLoader(data, batch_size=None))
    return model, record


def hand_grads(data: list[dict[str, Tensor]], keep: float, ref: nn.Module | str | None) -> list[dict[str, Tensor]]:
    """The plain loop: per-token losses, hand top-k of (excess) loss over valid tokens, masked mean, SGD."""
    torch.manual_seed(0)
    model = LM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for batch in data:
        losses, valid = token_losses(model.net(batch["input_ids"]), batch["labels"])
        scores = losses.detach()
        if isinstance(ref, str):
            scores = scores - batch[ref]
        elif ref is not None:
            with torch.no_grad():
                scores = scores - token_losses(ref(batch["input_ids"]), batch["labels"])[0]
        kept = select_tokens(scores, valid, keep)
        opt.zero_grad()
        (losses[kept].sum() / kept.sum()).backward()
        grads.append({f"net.{n}": p.grad.clone() for n, p in model.net.named_parameters()})
        opt.step()
    return grads


@pytest.mark.parametrize(("keep", "score", "ref"), [(0.6, "loss", None), (0.3, "excess_loss", "ref_loss")])
def test_gradients_equal_hand_written_masked_mean(keep: float, score: str, ref: str | None) -> None:
    data = batches(2, with_ref=ref is not None)
    _, record = fit(TokenSelection(keep=keep, score=score, reference=ref), data)
    for got, expected in zip(record.grads, hand_grads(data, keep, ref), strict=True):
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-7)


def test_reference_model_is_frozen_outside_optimizer_and_checkpoint_and_restored() -> None:
    data = batches(2)
    torch.manual_seed(1)
    reference = TinyLM().train()
    before = copy.deepcopy(reference.state_dict())
    cb = TokenSelection(keep=0.5, score="excess_loss", reference=reference)
    seen: dict[str, Any] = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            seen["training"] = reference.training
            seen["requires_grad"] = any(p.requires_grad for p in reference.parameters())
            opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            seen["in_optimizer"] = any(id(p) in opt_params for p in reference.parameters())
            seen["in_checkpoint"] = any(k.startswith("reference") for k in pl_module.state_dict())

    torch.manual_seed(0)
    model = LM()
    record = RecordGrads()
    quiet_trainer(max_steps=2, callbacks=[record, cb, Spy()]).fit(model, DataLoader(data, batch_size=None))
    assert seen == {"training": False, "requires_grad": False, "in_optimizer": False, "in_checkpoint": False}
    assert reference.training and all(p.requires_grad for p in reference.parameters())  # restored at teardown
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())  # never trained
    for got, expected in zip(record.grads, hand_grads(data, 0.5, reference), strict=True):
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-7)
    assert int(cb.tokens_valid) == 2 * (3 * (T - 1) - 1 - 2) and int(cb.tokens_kept) == 2 * 6


def test_outside_training_steps_the_loss_is_the_plain_valid_mean() -> None:
    model, cb = LM(), TokenSelection(keep=0.2)
    fit(cb, batches(1), model)
    losses, valid = torch.rand(2, 3), torch.tensor([[True, False, True], [True, True, True]])
    assert torch.equal(model.token_loss(losses, valid), masked_token_mean(losses, valid))


def test_model_that_never_calls_token_loss_is_refused() -> None:
    with pytest.raises(UsageError, match=r"never called self.token_loss"):
        fit(TokenSelection(keep=0.5), batches(1), LM(call_token_loss=False))


def test_not_a_mixin_model_and_shared_reference_are_refused() -> None:
    class Plain(L.LightningModule):
        pass

    with pytest.raises(UsageError, match=r"declare `class Plain\(PartialBackpropMixin"):
        TokenSelection().attach(quiet_trainer(), Plain())
    model = LM()
    with pytest.raises(ConfigurationError, match="shares parameters with the trained model"):
        fit(TokenSelection(score="excess_loss", reference=model.net), batches(1), model)


def test_missing_reference_key_is_named() -> None:
    with pytest.raises(UsageError, match=r"batch key 'ref'.*lacks"):
        fit(TokenSelection(score="excess_loss", reference="ref"), batches(1))


def test_state_resumes_counters_and_config_is_plain() -> None:
    cb = TokenSelection(keep=0.5)
    fit(cb, batches(2))
    again = TokenSelection(keep=0.5)
    again.load_state_dict(cb.state_dict())
    assert int(again.tokens_kept) == int(cb.tokens_kept) > 0
    assert again.run_summary() == cb.run_summary()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"keep": 0}, r"`keep` must be a fraction in \(0, 1\], got 0"),
        ({"keep": True}, r"`keep` must be a fraction"),
        ({"score": "entropy"}, r"`score` must be one of \('loss', 'excess_loss'\), got 'entropy'"),
        ({"reference": 3, "score": "excess_loss"}, r"`reference` must be an nn.Module, a batch key"),
        ({"score": "excess_loss"}, r"score='excess_loss' needs `reference`"),
        ({"reference": "ref"}, r"only used with score='excess_loss'"),
        ({"scope": "world"}, r"`scope` must be one of \('rank', 'global'\), got 'world'"),
        ({"labels_key": ""}, r"`labels_key` must be a non-empty string"),
        ({"shift": 1}, r"`shift` must be True or False"),
    ],
)
def test_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        TokenSelection(**kwargs)


def test_hugging_face_causal_lm_with_shifted_labels() -> None:
    pytest.importorskip("transformers")
    from tests.hf._models import HFModule, build, loader

    class Selective(HFModule):
        @override
        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return self.token_loss(*token_losses(logits, batch["labels"]), batch)

    torch.manual_seed(0)
    hf = build("llama", dropout=0.0)
    reference = copy.deepcopy(hf)
    model = Selective(hf)
    record = RecordGrads()
    cb = TokenSelection(keep=0.5, score="excess_loss", reference=reference)
    quiet_trainer(max_steps=1, callbacks=[record, cb]).fit(model, loader("llama", n=4))
    # By hand: at step 0 the model equals its reference, so every excess loss is 0 and the tie rule keeps the first
    # half of the tokens in flat order.
    torch.manual_seed(0)
    plain = build("llama", dropout=0.0)
    batch = next(iter(loader("llama", n=4)))
    losses, valid = token_losses(plain(input_ids=batch["input_ids"]).logits, batch["labels"])
    kept = select_tokens(torch.zeros_like(losses), valid, 0.5)
    assert kept.view(-1)[: kept.sum()].all()
    (losses[kept].sum() / kept.sum()).backward()
    for name, p in plain.named_parameters():
        torch.testing.assert_close(record.grads[0][f"model.{name}"], p.grad, rtol=1e-5, atol=1e-6)
