"""The LLM job's model: a small Hugging Face ``LlamaForCausalLM`` on bytes, optionally with PEFT LoRA adapters.

:class:`ByteLM` builds the model from a ``LlamaConfig`` (random weights, no download; ``transformers`` is an
optional dependency: ``pip install 'lit-partial[hf]'``) and holds it as ``self.model``, so the parameter names
are the Hugging Face ones every LLM preset selects: ``model.model.embed_tokens``, ``model.model.layers.N.self_attn
.{q,k,v,o}_proj``, ``model.model.layers.N.mlp.{gate,up,down}_proj``, ``model.model.norm``, ``model.lm_head``. With
``lora_rank > 0`` the model is wrapped by ``peft.get_peft_model`` (base weights frozen, ``lora_A``/``lora_B`` on
``lora_targets``); :meth:`ByteLM.pretrained_names` maps the names of the plain model's pretrained weights to
the wrapped ones, so one cached pretraining serves both.

Validation logs ``val_loss`` and ``val_bpb`` on the training domain and ``forget_loss`` / ``forget_bpb`` on the
second validation loader (:class:`~lit_partial.demos.text.TextDataModule`). A token is a byte, so bits per byte
is the mean token cross-entropy (nats) divided by ``ln 2``.

Example:
    >>> model = ByteLM(layers=2, width=32, heads=2, kv_heads=1, intermediate=64, seq_len=16)
    >>> batch = torch.randint(0, 256, (3, 17))
    >>> model.per_sample_loss(batch).shape
    torch.Size([3])
    >>> sorted({n.split(".")[2] for n, _ in model.named_parameters() if n.startswith("model.model.")})
    ['embed_tokens', 'layers', 'norm']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor
from typing_extensions import override

from lit_partial.errors import ConfigurationError
from lit_partial.module import PartialBackpropMixin

__all__ = ["VOCAB", "ByteLM", "bits_per_byte"]

#: Byte tokens.
VOCAB = 256
_PEFT_PARTS = ("base_model.model.", ".base_layer")


def bits_per_byte(loss: Tensor) -> Tensor:
    """Bits per byte of a mean byte-token cross-entropy in nats: ``loss / ln 2``.

    Example:
        >>> float(bits_per_byte(torch.tensor(math.log(256))))
        8.0
    """
    return loss / math.log(2)


def _positive_int(name: str, value: Any, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(f"`{name}` must be an integer >= {low}, got {value!r}.")


class ByteLM(PartialBackpropMixin, L.LightningModule):
    """A byte-level causal LM (Hugging Face Llama built from a config), ready for every lit_partial technique.

    Args:
        layers: Decoder layers (``model.model.layers.0`` ... ``layers.<layers-1>``).
        width: Hidden size.
        heads: Attention heads (``width`` must be a multiple).
        kv_heads: Key/value heads (grouped-query attention when fewer than ``heads``).
        intermediate: MLP width.
        seq_len: Longest sequence (``max_position_embeddings``).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        lora_rank: 0 trains the model's own weights; > 0 wraps it with PEFT LoRA of this rank.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_rank``).
        lora_targets: Module names LoRA adapts (PEFT's ``target_modules``).
        lora_dropout: Dropout on the LoRA path.

    Raises:
        ConfigurationError: A size below 1 (``lora_rank`` below 0), ``width`` not a multiple of ``heads`` or
            ``heads`` of ``kv_heads``, ``lr`` not finite and positive, ``weight_decay`` negative, no
            ``lora_targets`` while ``lora_rank > 0``.
        ImportError: ``transformers`` (or, with LoRA, ``peft``) is not installed.
    """

    def __init__(
        self,
        layers: int = 8,
        width: int = 128,
        heads: int = 4,
        kv_heads: int = 4,
        intermediate: int = 256,
        seq_len: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lora_rank: int = 0,
        lora_alpha: int = 16,
        lora_targets: Sequence[str] = ("q_proj", "v_proj"),
        lora_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("layers", layers), ("width", width), ("heads", heads), ("kv_heads", kv_heads)):
            _positive_int(name, value)
        _positive_int("intermediate", intermediate)
        _positive_int("seq_len", seq_len)
        _positive_int("lora_rank", lora_rank, low=0)
        if width % heads:
            raise ConfigurationError(f"`width` {width} must be a multiple of `heads` {heads}; e.g. width={heads * 32}.")
        if heads % kv_heads:
            raise ConfigurationError(f"`heads` {heads} must be a multiple of `kv_heads` {kv_heads}; e.g. kv_heads=1.")
        if not (isinstance(lr, int | float) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0):
            raise ConfigurationError(f"`lr` must be a finite number > 0, got {lr!r}; e.g. lr=1e-3.")
        if not (isinstance(weight_decay, int | float) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ConfigurationError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}.")
        lora_targets = [str(t) for t in lora_targets]  # a plain list: checkpoints load with weights_only=True
        if lora_rank and not lora_targets:
            raise ConfigurationError("`lora_targets` is empty while `lora_rank` > 0; e.g. lora_targets=[q_proj].")
        self.save_hyperparameters()
        try:
            import transformers
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("ByteLM needs transformers: pip install 'lit-partial[hf]'") from err
        transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # untyped in transformers
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=width, intermediate_size=intermediate, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        )  # fmt: skip
        model: torch.nn.Module = transformers.LlamaForCausalLM(config)
        if lora_rank:
            import peft

            lora = peft.LoraConfig(
                r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=lora_targets
            )
            model = peft.get_peft_model(model, lora)
        self.model = model

    def pretrained_names(self) -> dict[str, str]:
        """``{name in the plain model: name here}`` of every tensor a pretraining of the plain model provides.

        Without LoRA the names are equal; under PEFT, ``model.base_model.model.model.layers.0.self_attn.q_proj
        .base_layer.weight`` is the pretrained ``model.model.layers.0.self_attn.q_proj.weight`` (adapters have no
        pretrained counterpart and are left out).
        """
        names = {}
        for name in self.state_dict():
            if "lora_" in name:
                continue
            plain = name
            for part in _PEFT_PARTS:
                plain = plain.replace(part, "")
            names[plain] = name
        return names

    @override
    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (FSDP2): ``fully_shard`` every decoder layer, then the root."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self, FSDPModule):  # configure_model runs again for a second fit / validate
            return
        for name, module in self.named_modules():
            if name.rpartition(".")[0].endswith("model.layers"):
                fully_shard(module, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])

    @override
    def forward(self, ids: Tensor) -> Tensor:
        logits: Tensor = self.model(input_ids=ids).logits
        return logits

    def _token_losses(self, batch: Any) -> Tensor:
        blocks = batch[0] if isinstance(batch, list | tuple) else batch
        logits = self(blocks[:, :-1])
        targets = blocks[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none").view_as(targets)

    @override
    def per_sample_loss(self, batch: Any) -> Tensor:
        return self._token_losses(batch).mean(1)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = self._token_losses(batch)  # every target byte counts; TokenSelection (if attached) keeps the top ones
        loss = self.token_loss(losses, torch.ones_like(losses, dtype=torch.bool), batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        prefix = "val" if dataloader_idx == 0 else "forget"
        loss = self._token_losses(batch).mean()
        size = len(batch[0] if isinstance(batch, list | tuple) else batch)
        kw: dict[str, Any] = {"add_dataloader_idx": False, "sync_dist": True, "batch_size": size}
        self.log(f"{prefix}_loss", loss, prog_bar=dataloader_idx == 0, **kw)
        self.log(f"{prefix}_bpb", bits_per_byte(loss), **kw)

    @override
    def configure_optimizers(self) -> OptimizerLRScheduler:
        hp = self.hparams
        return torch.optim.AdamW(self.partial_param_groups(lr=hp["lr"], weight_decay=hp["weight_decay"]))
