"""``TokenSelection``: backpropagate the loss of only the top fraction of target tokens (Rho-1).

Selective language modeling (Lin et al., NeurIPS 2024): score every valid target token by its loss, or by its
*excess* loss over a reference model (``L_theta - L_ref``), and average the loss over the top ``keep`` fraction
only. A causal forward cannot drop tokens, so this is a loss mask: the model computes per-token losses and hands
them to :meth:`~lit_partial.PartialBackpropMixin.token_loss`, which this callback rules on in training steps.

Design choices:

* **Valid tokens.** Labels of ``-100`` (Hugging Face's ignore index: padding, prompts) are never selected and never
  counted: ``k = round(keep * n_valid)``, at least 1 when any token is valid.
* **Reference.** ``reference=`` takes a frozen module - put in eval mode, with ``requires_grad=False``, run under
  ``no_grad``, held by the callback (so it is in neither the optimizer nor the checkpoint); its flags and device are
  restored at teardown - or the name of a batch key holding precomputed reference losses, shaped like the losses.
* **Scope.** ``scope="rank"`` selects within each rank's batch (no communication; every rank's loss is its own
  masked mean, as DDP then averages). ``scope="global"`` selects the top ``keep`` of all ranks' valid tokens
  together (two all-gathers per step) and scales each rank's sum so the averaged gradient is the gradient of the
  masked mean over all kept tokens. Both are exact under DDP and FSDP2: selection changes no collective.
* **No sync, no state.** Counts stay on the device; the only state is the token counters.

Example:
    >>> ts = TokenSelection(keep=0.6)
    >>> ts.config()["keep"], ts.config()["scope"]
    (0.6, 'rank')
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lit_partial.callbacks.base import Technique
from lit_partial.distributed import world_size
from lit_partial.errors import ConfigurationError, UsageError
from lit_partial.functional.token_selection import (
    SCORES,
    masked_token_mean,
    num_kept_tokens,
    select_tokens,
    token_losses,
    token_scores,
)
from lit_partial.handles import Handle, register_gate
from lit_partial.module import TOKEN_LOSS_GATE, PartialBackpropMixin

__all__ = ["TokenSelection"]

SCOPES = ("rank", "global")


class TokenSelection(Technique):
    """Average the training loss over the top ``keep`` fraction of valid target tokens (Rho-1).

    The model computes per-token losses and returns ``self.token_loss(losses, valid, batch)`` from
    ``training_step`` (see :func:`lit_partial.functional.token_selection.token_losses`); outside training steps
    that is the plain mean over valid tokens.

    Args:
        keep: Fraction of valid tokens whose loss is backpropagated, in (0, 1].
        score: ``"loss"`` ranks tokens by their loss; ``"excess_loss"`` by ``L_theta - L_ref``.
        reference: For ``"excess_loss"``: a frozen ``nn.Module`` called on the batch (a mapping batch without
            ``labels_key`` as keyword arguments, else its first element; ``.logits`` of the output if present), or
            the name of a batch key holding reference losses shaped like the model's per-token losses.
        scope: ``"rank"`` selects within each rank's batch; ``"global"`` over all ranks' tokens together.
        labels_key: Batch key of the labels the reference model's losses are computed on.
        shift: Shift labels for the reference model's losses, as for a causal LM (see ``token_losses``).
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`).

    Attributes:
        tokens_valid: Valid target tokens seen in training steps by this rank (a tensor, no sync per step).
        tokens_kept: Of those, the ones whose loss was backpropagated.

    Example:
        >>> TokenSelection(keep=0.7, score="excess_loss", reference="ref_loss").config()["reference"]
        'ref_loss'
    """

    def __init__(
        self,
        keep: float = 0.6,
        score: str = "loss",
        reference: nn.Module | str | None = None,
        scope: str = "rank",
        *,
        labels_key: str = "labels",
        shift: bool = True,
        accept_config_change: bool = False,
    ) -> None:
        super().__init__(accept_config_change=accept_config_change)
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise ConfigurationError(f"`keep` must be a fraction in (0, 1], got {keep!r}; e.g. keep=0.6.")
        if score not in SCORES:
            raise ConfigurationError(f"`score` must be one of {SCORES}, got {score!r}.")
        if reference is not None and not isinstance(reference, (nn.Module, str)):
            raise ConfigurationError(
                f"`reference` must be an nn.Module, a batch key (str) or None, got {type(reference).__name__}."
            )
        if score == "excess_loss" and reference is None:
            raise ConfigurationError(
                "score='excess_loss' needs `reference`: a frozen reference model, or the batch key of precomputed "
                "reference losses, e.g. reference='ref_loss'."
            )
        if score == "loss" and reference is not None:
            raise ConfigurationError(
                "`reference` is only used with score='excess_loss'; got score='loss'. Fix: drop `reference`, or set "
                "score='excess_loss'."
            )
        if scope not in SCOPES:
            raise ConfigurationError(f"`scope` must be one of {SCOPES}, got {scope!r}.")
        if not isinstance(labels_key, str) or not labels_key:
            raise ConfigurationError(f"`labels_key` must be a non-empty string, got {labels_key!r}.")
        if not isinstance(shift, bool):
            raise ConfigurationError(f"`shift` must be True or False, got {shift!r}.")
        self.keep, self.score, self.reference, self.scope = float(keep), score, reference, scope
        self.labels_key, self.shift = labels_key, shift
        self.tokens_valid: Tensor = torch.zeros((), dtype=torch.int64)
        self.tokens_kept: Tensor = torch.zeros((), dtype=torch.int64)
        self._active = False
        self._seen = False
        self._checked = False
        self._last: dict[str, Tensor] = {}

    @override
    def config(self) -> dict[str, Any]:
        reference = self.reference
        described = f"module:{type(reference).__name__}" if isinstance(reference, nn.Module) else reference
        return {
            "keep": self.keep,
            "score": self.score,
            "reference": described,
            "scope": self.scope,
            "labels_key": self.labels_key,
            "shift": self.shift,
        }

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = type(pl_module).__name__
        if not isinstance(pl_module, PartialBackpropMixin):
            raise UsageError(
                f"TokenSelection rules on the per-token loss, which {name} does not hand over. Fix: declare "
                f"`class {name}(PartialBackpropMixin, L.LightningModule)` and return "
                "`self.token_loss(losses, valid, batch)` from training_step."
            )
        if any(isinstance(cb, TokenSelection) and cb is not self for cb in trainer.callbacks):  # type: ignore[attr-defined]
            raise ConfigurationError("several TokenSelection callbacks; keep one (each would reselect the tokens).")
        if isinstance(self.reference, nn.Module):
            self.handles.add(self._freeze_reference(self.reference, pl_module))
        self.handles.add(register_gate(pl_module, TOKEN_LOSS_GATE, self._reduce))
        self._checked = False
        rank_zero_info(
            f"TokenSelection: keep={self.keep} of valid tokens by {self.score}, scope={self.scope}"
            + (f", reference={self.config()['reference']}" if self.reference is not None else "")
        )

    @staticmethod
    def _freeze_reference(reference: nn.Module, pl_module: nn.Module) -> Handle:
        own = {id(p) for p in pl_module.parameters()}
        if any(id(p) in own for p in reference.parameters()):
            raise ConfigurationError(
                f"the reference model ({type(reference).__name__}) shares parameters with the trained model, so it "
                "would be trained and checkpointed with it. Fix: pass a separate copy (e.g. copy.deepcopy(model)) "
                "or precomputed reference losses (reference='<batch key>')."
            )
        flags = [(p, p.requires_grad) for p in reference.parameters()]
        training = reference.training
        first = next(reference.parameters(), None)
        device = first.device if first is not None else None
        reference.eval()
        reference.requires_grad_(False)

        def undo() -> None:
            for p, flag in flags:
                p.requires_grad_(flag)
            reference.train(training)
            if device is not None:
                reference.to(device)

        return Handle(undo)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if isinstance(self.reference, nn.Module):
            self.reference.to(device)
        self.tokens_valid = self.tokens_valid.to(device)
        self.tokens_kept = self.tokens_kept.to(device)

    def _reference_losses(self, batch: Any, losses: Tensor) -> Tensor:
        if batch is None:
            raise UsageError(
                "TokenSelection(score='excess_loss') needs the batch for its reference. Fix: call "
                "`self.token_loss(losses, valid, batch)` with the batch."
            )
        if isinstance(self.reference, str):
            if not isinstance(batch, Mapping) or self.reference not in batch:
                keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
                raise UsageError(
                    f"TokenSelection(reference={self.reference!r}) reads reference losses from the batch key "
                    f"{self.reference!r}, which the batch lacks (it has {keys})."
                )
            return batch[self.reference]  # type: ignore[no-any-return]  # a batch mapping
        reference = self.reference
        assert isinstance(reference, nn.Module)  # checked in __init__
        if not isinstance(batch, Mapping) or self.labels_key not in batch:
            raise UsageError(
                f"TokenSelection's reference model needs labels under the batch key {self.labels_key!r}; the batch is "
                f"{type(batch).__name__}. Fix: set labels_key=..., or pass precomputed losses (reference='<key>')."
            )
        inputs = {key: value for key, value in batch.items() if key != self.labels_key}
        trainer = self.model.trainer if isinstance(self.model, L.LightningModule) else None
        context = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
        with torch.no_grad(), context:
            out = reference(**inputs)
        logits = getattr(out, "logits", out)
        ref, _ = token_losses(logits, batch[self.labels_key], shift=self.shift)
        return ref

    def _reduce(self, args: tuple[Tensor, Tensor, Any]) -> Tensor:
        losses, valid, batch = args
        self._seen = True
        if not self._active:
            return masked_token_mean(losses, valid)
        if losses.shape != valid.shape:
            raise UsageError(
                f"token_loss needs losses and valid of one shape (B, T), got {tuple(losses.shape)} and "
                f"{tuple(valid.shape)}."
            )
        reference = self._reference_losses(batch, losses) if self.score == "excess_loss" else None
        scores = token_scores(losses, reference, score=self.score)
        valid = valid.bool()
        if self.scope == "global" and world_size() > 1:
            kept, count, scale = _global_selection(scores, valid, self.keep)
        else:
            kept = select_tokens(scores, valid, self.keep)
            count, scale = kept.sum(), 1
        n_valid = valid.sum()
        self.tokens_valid = self.tokens_valid.to(n_valid.device) + n_valid
        self.tokens_kept = self.tokens_kept.to(n_valid.device) + kept.sum()
        self._last = {"kept_fraction": kept.sum() / n_valid.clamp_min(1)}
        return masked_token_mean(losses, kept, count=count) * scale

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._active, self._seen = True, False

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._active = False
        if not self._checked:
            self._checked = True
            if not self._seen:
                raise UsageError(
                    f"TokenSelection: {type(pl_module).__name__}.training_step never called self.token_loss(...), so "
                    "every token would silently train. Fix: return `self.token_loss(losses, valid, batch)`, with "
                    "`losses, valid = lit_partial.functional.token_selection.token_losses(logits, labels)`."
                )
        if self._last:
            pl_module.log(
                "tokens/kept_fraction", self._last["kept_fraction"], on_step=True, on_epoch=False, batch_size=1
            )

    @override
    def cleanup(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        self._active = False

    @override
    def run_summary(self) -> list[str]:
        valid = int(self.tokens_valid)
        if not valid:
            return []
        kept = int(self.tokens_kept)
        return [f"TokenSelection ({self.score}, keep={self.keep}): backpropagated {kept:,} of {valid:,} tokens"]

    @override
    def technique_state(self) -> dict[str, Any]:
        return {"tokens_valid": int(self.tokens_valid), "tokens_kept": int(self.tokens_kept)}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self.tokens_valid = torch.tensor(int(state.get("tokens_valid", 0)))
        self.tokens_kept = torch.tensor(int(state.get("tokens_kept", 0)))


def _global_selection(scores: Tensor, valid: Tensor, keep: float) -> tuple[Tensor, Tensor, float]:
    """This rank's share of the top ``keep`` of all ranks' valid tokens, the global kept count, and the scale.

    Ranks are concatenated in rank order, so ties keep the lower rank, then the lower flat index. The scale
    ``world_size`` turns this rank's ``sum / k_global`` into a loss whose DDP-averaged gradient is the gradient
    of the masked mean over all kept tokens.
    """
    import torch.distributed as dist

    world = world_size()
    n = torch.tensor([scores.numel()], device=scores.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]  # one sync per step: the price of a global selection
    longest = max(counts)
    flat = torch.full((longest,), -torch.inf, device=scores.device)
    flat[: scores.numel()] = scores.reshape(-1)
    flat_valid = torch.zeros(longest, dtype=torch.bool, device=scores.device)
    flat_valid[: scores.numel()] = valid.reshape(-1)
    packed = torch.stack([flat, flat_valid.float()])
    gathered = [torch.zeros_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    all_scores = torch.cat([g[0, :c] for g, c in zip(gathered, counts, strict=True)])
    all_valid = torch.cat([g[1, :c] for g, c in zip(gathered, counts, strict=True)]).bool()
    k = num_kept_tokens(all_valid.sum(), keep)
    kept_all = select_tokens(all_scores, all_valid, keep, k=k)
    start = sum(counts[: dist.get_rank()])
    return kept_all[start : start + scores.numel()].view(scores.shape), k, float(world)
