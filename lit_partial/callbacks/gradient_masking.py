"""``GradientMasking``: element-wise 0/1 masks on parameters; masked elements never change.

The tensor work lives in :mod:`lit_partial.functional.masking` (kernels) and
:mod:`lit_partial.functional.mask_builders` (specs -> masks); this callback resolves selectors, decides
when masks are applied and rebuilt, keeps them for resume, and logs.

Timing (Lightning 2.x): gradients are masked in ``on_before_optimizer_step``, which runs once per
optimizer step (not per micro-batch under ``accumulate_grad_batches``), after AMP unscaling and after
DDP's all-reduce, and before gradient clipping, so clipping sees the masked norm. With
``mask_in_backward=True`` (one process), static masks are applied by post-accumulate-grad hooks instead
(:func:`~lit_partial.functional.backward_masking.mask_gradients_in_backward`), and the step masks only the
gradients written since (an fp16 ``GradScaler``'s unscale, a user's hook). With ``strict=True``
the real torch optimizers in ``trainer.optimizers`` get step pre/post hooks that keep masked elements
bit-identical (:func:`~lit_partial.functional.masking.guard_masked_elements`); they are removed in
``teardown``.

Under FSDP2 (``ModelParallelStrategy``), ``fully_shard`` replaces the parameters in ``configure_model``,
after ``setup``: selectors are checked in ``setup``, but masks are built in ``on_fit_start`` from the
sharded parameters. Each static mask is built once from the full parameter (gathered), then sharded like
it (scattered from rank 0, as DDP broadcasts rank 0's masks); ``where`` masks are computed on each rank's
local shard. Kernels run on local shards without communication.

Example:
    >>> import torch
    >>> cb = GradientMasking({"head.1.weight": {"kind": "rows", "index": [0, 1]},
    ...                       "backbone.*.0.weight": {"kind": "random", "keep": 0.1, "seed": 0},
    ...                       "re:.*bias": torch.tensor(1.0)})
    >>> from lit_partial.demos import DigitsClassifier, DigitsDataModule
    >>> model = DigitsClassifier()
    >>> head = model.head[1].weight.detach().clone()
    >>> trainer = L.Trainer(callbacks=[cb], max_steps=2, logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    >>> trainer.fit(model, DigitsDataModule())
    >>> bool(torch.equal(model.head[1].weight[2:], head[2:])), bool(torch.equal(model.head[1].weight[:2], head[:2]))
    (True, False)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lit_partial._compat import non_finite_check_and_unscale_, scaler_found_inf_per_device
from lit_partial._plain import to_plain
from lit_partial.callbacks.base import Technique
from lit_partial.distributed import (
    broadcast_parameters,
    full_tensor,
    is_dtensor,
    is_sharded,
    local_tensor,
    shard_like,
    world_size,
)
from lit_partial.errors import UsageError
from lit_partial.functional.backward_masking import BackwardMasks, mask_gradients_in_backward
from lit_partial.functional.mask_builders import (
    MASK_FORMS,
    MaskError,
    MaskSource,
    as_bool_mask,
    build_where_mask,
    check_mask_source,
    is_dynamic_spec,
    resolve_mask_source,
)
from lit_partial.functional.masking import (
    count_masked,
    floor_second_moments,
    guard_masked_elements,
    kernel_mask,
    mask_gradients,
)
from lit_partial.selectors import as_selector_list, describe_ties, preview, select_parameters, tied_parameter_names
from lit_partial.summary import record_masked

__all__ = ["GradientMasking", "MaskError"]


@dataclass
class _Masked:
    """One masked parameter: where its mask came from and the current bool mask (True = may change)."""

    selector: str
    name: str
    param: nn.Parameter
    mask: Tensor | None = None  # a DTensor sharded like the parameter when the parameter is one
    dynamic: dict[str, Any] | None = None  # a "where" spec, rebuilt from the weights at every step
    fresh: bool = False  # dynamic mask already rebuilt for the coming optimizer step
    optimizers: list[int] = field(default_factory=list)
    frozen: int = 0  # masked elements (over all ranks), counted when the mask is built, loaded or logged
    wide: Tensor | None = None  # strict on CPU: the mask as an int as wide as the parameter, made from `wide_of`
    wide_of: Tensor | None = None


class GradientMasking(Technique):
    """Element-wise masks on selected parameters: elements where the mask is 0 never change.

    Args:
        masks: Maps parameter selectors (exact name, glob or ``re:<pattern>``; a module selects its
            parameters) to a mask source: a tensor broadcasting to each selected parameter (1 = may change,
            0 = must not); a path to a ``.pt`` file holding ``{parameter_name: tensor}``; a builder spec
            (``{"kind": "random", "keep": f, "seed": s}``, ``{"kind": "magnitude", "keep": f, "largest": true}``,
            ``{"kind": "rows"|"columns"|"channels", "index": [...]}``, ``{"kind": "where", "op": ">",
            "value": 0.0}`` (rebuilt from the current weights before every step), see
            :mod:`lit_partial.functional.mask_builders`); or a callable ``(name, param) -> mask``.
        strict: If True (default), masked elements are bit-identical after every ``optimizer.step()`` for
            every ``torch.optim`` optimizer (momentum, Adam moments and weight decay included): the optimizer's
            step hooks keep and restore them, at the cost of one snapshot buffer per masked parameter (its
            size, like one more optimizer moment; freed in ``teardown``; on CPU also the mask as int32, which
            the kernels read faster than the bool) and one restore pass per step (static masks).
            If False, only gradients are masked: cheapest, and exact only for plain SGD (no momentum, no
            weight decay); other optimizers let masked elements drift.
        log_fraction: Log ``masked_fraction/<selector>`` (fraction of frozen elements) at the logging cadence.
        mask_in_backward: Mask static masks' gradients in a post-accumulate-grad hook as autograd finishes each
            one, while it is still in cache, instead of in one pass at the step (single process only; gradients
            written after the backward are masked again at the step, told by their version counter, which writes
            through ``param.grad.data`` bypass). Off by default: on the benchmark CPU it made the step slower, not
            faster (the pass evicts the rest of the backward's working set); measure it on your hardware.
        reuse_snapshots: Strict mode only: skip re-reading a masked parameter that was not written in place
            since the last step (version counter unchanged); halves the strict cost for static masks. Set
            False if your code writes masked elements through ``param.data`` between steps (that bypasses
            the version counter, and the write would be undone).
        accept_config_change: Resume from a checkpoint made with other masks (see
            :class:`~lit_partial.callbacks.base.Technique`); by default that is an error naming what changed.

    Raises:
        MaskError: Before training, for a malformed mask source, values other than 0/1, ``keep`` outside
            ``(0, 1]``, unknown builder kinds, masks that do not broadcast, or overlapping selectors.
        SelectorError: At ``setup``, for a selector matching no parameter (naming the closest names).

    Notes:
        * Masks are bool (1 byte per element; structured masks keep their broadcast shape), live on
          their parameter's device and follow it. Random masks come from a generator seeded by
          ``(seed, parameter name)``: identical on every rank and every run. Under DDP, static masks are
          also broadcast from rank 0 once at fit start, so masks built from per-rank data agree too.
        * Checkpoints hold every static mask keyed by parameter name; resume restores them exactly
          (a magnitude mask is not rebuilt from the resumed weights). ``where`` masks are rebuilt.
        * Optimizer *state* of masked elements may still change; their values do not. Under Adam, AdamW,
          NAdam, RAdam, RMSprop and Adagrad, the square-rooted second moment of masked elements is kept at or
          above 2**-100 instead of exactly 0 (see :func:`~lit_partial.functional.masking.floor_second_moments`:
          ``sqrt(0)`` is slow on CPUs); their first moment stays whatever the optimizer makes of a zero gradient.
        * With fp16 ``GradScaler``, the scaler's overflow check is redone on the masked gradients, so an inf
          only in masked positions neither skips the step nor shrinks the scale.
        * LBFGS re-evaluates its closure inside one step; it works with static masks in strict mode,
          but not with ``where`` masks (the mask could change inside the step), which is an error.

    Example:
        >>> cb = GradientMasking({"head.1.weight": {"kind": "where", "op": ">", "value": 0.0}})
        >>> cb.strict
        True
    """

    def __init__(
        self,
        masks: Mapping[str, MaskSource],
        strict: bool = True,
        log_fraction: bool = True,
        reuse_snapshots: bool = True,
        mask_in_backward: bool = False,
        *,
        accept_config_change: bool = False,
    ) -> None:
        super().__init__(accept_config_change=accept_config_change)
        masks = to_plain(masks)
        if not isinstance(masks, Mapping):
            raise MaskError(f"`masks` must map parameter selectors to masks, got {type(masks).__name__}: {MASK_FORMS}.")
        if not masks:
            raise MaskError("`masks` is empty; map at least one selector to a mask, e.g. {'head.weight': mask}.")
        if not isinstance(strict, bool):
            raise UsageError(f"`strict` must be True or False, got {strict!r}.")
        if not isinstance(log_fraction, bool):
            raise UsageError(f"`log_fraction` must be True or False, got {log_fraction!r}.")
        if not isinstance(reuse_snapshots, bool):
            raise UsageError(f"`reuse_snapshots` must be True or False, got {reuse_snapshots!r}.")
        if not isinstance(mask_in_backward, bool):
            raise UsageError(f"`mask_in_backward` must be True or False, got {mask_in_backward!r}.")
        self._sources: dict[str, Any] = {}
        for selector, source in masks.items():
            as_selector_list(selector, argument=f"masks key {selector!r}")
            self._sources[selector] = check_mask_source(selector, to_plain(source))
        self.strict = strict
        self.log_fraction = log_fraction
        self.reuse_snapshots = reuse_snapshots
        self.mask_in_backward = mask_in_backward
        self._entries: list[_Masked] = []
        self._backward: BackwardMasks | None = None

    @override
    def config(self) -> dict[str, Any]:
        return {
            "masks": {selector: _describe(source) for selector, source in self._sources.items()},
            "strict": self.strict,
        }

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current bool masks (True = may change) keyed by parameter name; empty before ``setup``."""
        return {e.name: e.mask for e in self._entries if e.mask is not None}

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if is_sharded(trainer):  # fully_shard replaces the parameters later (configure_model): build then
            for selector in self._sources:
                select_parameters(pl_module, selector)  # unknown selectors still fail here, before anything runs
            self._entries = []
            return
        self._entries = self._build(pl_module)
        self._record_counts(pl_module)

    @override
    def run_summary(self) -> list[str]:
        lines = []
        for selector in self._sources:
            group = [e for e in self._entries if e.selector == selector and e.mask is not None]
            total = sum(e.param.numel() for e in group)
            frozen = sum(e.frozen for e in group)
            if total:
                lines.append(
                    f"GradientMasking {selector}: {frozen:,} of {total:,} elements masked "
                    f"({100.0 * frozen / total:.1f}%) in {len(group)} tensors, "
                    + ("strict" if self.strict else "gradients only")
                )
        return lines

    def _build(self, model: nn.Module) -> list[_Masked]:
        entries: list[_Masked] = []
        owner: dict[int, str] = {}
        aliases = {names[0]: names for names in tied_parameter_names(model)}
        for selector, source in self._sources.items():
            for name, param in select_parameters(model, selector):
                if id(param) in owner:
                    tied = f" (one tensor tied under the names {aliases[name]})" if name in aliases else ""
                    raise MaskError(
                        f"parameter {name!r}{tied} is selected by masks {owner[id(param)]!r} and {selector!r}; "
                        "give each parameter one mask (make the selectors disjoint, e.g. with 're:...')."
                    )
                owner[id(param)] = selector
                entry = _Masked(selector, name, param)
                if is_dynamic_spec(source):
                    entry.dynamic = source
                    entry.mask = _where_mask(param, source)
                else:
                    full = full_tensor(param.detach())  # sharded: gathered (every rank, same order)
                    mask = resolve_mask_source(selector, source, name, full)
                    entry.frozen = count_masked(full, mask)
                    entry.mask = shard_like(mask, param)  # sharded: rank 0's mask, scattered like the parameter
                entries.append(entry)
        for note in describe_ties(model, [(e.name, e.param) for e in entries]):
            rank_zero_info(f"GradientMasking: {note}; its mask is kept under its first name in masks and checkpoints.")
        return entries

    def _record_counts(self, model: nn.Module) -> None:
        for e in self._entries:
            if e.dynamic is not None:  # where masks change with the weights (sharded: counted over all ranks)
                e.frozen = count_masked(e.param, e.mask)  # type: ignore[arg-type]  # built in setup
        record_masked(model, {e.name: e.frozen for e in self._entries})

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if is_sharded(trainer):  # the strategy has sharded the model: resolve the (new) parameters now
            self._entries = self._build(pl_module)
            self._record_counts(pl_module)
        for e in self._entries:  # the strategy has moved the model by now; masks follow their parameter
            e.mask = e.mask.to(e.param.device)  # type: ignore[union-attr]  # built in setup
        if world_size() > 1 and not is_sharded(trainer):  # sharded masks were scattered from rank 0
            self._broadcast_static_masks()
        self._backward = None
        if self.mask_in_backward and world_size() == 1 and not is_sharded(trainer):
            # One process: autograd's accumulation is the gradient's last write before the step. (DDP's all-reduce
            # and FSDP2's reduce-scatter write after it: there the step-time pass does the work.)
            hot = [e for e in self._entries if e.dynamic is None and e.param.requires_grad and not is_dtensor(e.param)]
            if hot:
                self._backward = mask_gradients_in_backward([(e.param, self._mask_of(e)) for e in hot])
                self.handles.add(self._backward)
        for index, optimizer in enumerate(trainer.optimizers):
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            mine = [e for e in self._entries if id(e.param) in owned]
            for e in mine:
                e.optimizers.append(id(optimizer))
            if not mine:
                continue
            dynamic = any(e.dynamic for e in mine)
            if self.strict and dynamic and isinstance(optimizer, torch.optim.LBFGS):
                raise MaskError(
                    f"optimizer {index} is LBFGS, whose step re-evaluates the closure, while 'where' masks change "
                    "with the weights; strict masking cannot hold one mask through such a step. Fix: use a static "
                    "mask (e.g. a tensor or 'magnitude'), or another optimizer."
                )
            pairs = self._pairs_provider(mine)
            if self.strict:
                self.handles.add(guard_masked_elements(optimizer, pairs, self.reuse_snapshots))
            # Adam-like optimizers: masked second moments kept off exact zero, whose sqrt is slow on CPUs. Registered
            # before the stale marker, so a "where" mask is the one in force for the step just taken.
            self.handles.add(floor_second_moments(optimizer, pairs))
            if dynamic:
                self.handles.add(optimizer.register_step_post_hook(self._stale_marker(mine)))
        total = sum(e.param.numel() for e in self._entries)
        frozen = sum(e.frozen for e in self._entries)
        rank_zero_info(
            f"GradientMasking: {len(self._entries)} parameters masked, {frozen:,} of {total:,} elements frozen "
            f"({'strict: bit-identical for any optimizer' if self.strict else 'gradients only: exact for plain SGD'})."
        )

    def _broadcast_static_masks(self) -> None:
        static = [e for e in self._entries if e.dynamic is None]
        as_bytes = [e.mask.to(torch.uint8) for e in static]  # type: ignore[union-attr]  # built in setup
        broadcast_parameters(as_bytes)  # gloo cannot send bool; rank 0's masks win if ranks built differently
        for e, b in zip(static, as_bytes, strict=True):
            e.mask = b.bool()
            e.frozen = count_masked(e.param, e.mask)

    def _pairs_provider(self, entries: list[_Masked]) -> Callable[[], list[tuple[Tensor, Tensor]]]:
        def pairs() -> list[tuple[Tensor, Tensor]]:
            self._refresh(entries)
            return [(e.param, self._kernel(e)) for e in entries if e.param.requires_grad]

        return pairs

    def _kernel(self, e: _Masked) -> Tensor:
        """The mask as the kernels read it: strict on CPU, a static mask as wide as its parameter, else the bool.

        On CPU the restore and the gradient select multiply int32 views by the mask; an int32 mask vectorizes where
        an int8 one converts per element, and strict steps measured 0.6-3.5 points faster with it (benchmarks
        masking: the 'int8 masks' rows), at 4 bytes per masked element beside the strict snapshot's 4. Gradients-only
        runs keep the 1-byte bool (no gain measured there); a ``where`` mask changes every step (so stays bool).
        """
        mask: Tensor = e.mask  # type: ignore[assignment]  # built in setup
        if not self.strict or e.dynamic is not None or local_tensor(e.param).device.type != "cpu":
            return mask
        if e.wide_of is not mask:
            e.wide, e.wide_of = kernel_mask(mask, e.param, wide=True), mask
        return e.wide  # type: ignore[return-value]  # just set

    def _mask_of(self, e: _Masked) -> Callable[[], Tensor | None]:
        return lambda: self._kernel(e)

    @staticmethod
    def _stale_marker(entries: list[_Masked]) -> Callable[..., None]:
        def mark(*_: Any) -> None:
            for e in entries:
                e.fresh = False

        return mark

    @staticmethod
    def _refresh(entries: list[_Masked]) -> None:
        # Rebuilt at most once per optimizer step, by whichever comes first: on_before_optimizer_step or the
        # step pre-hook (AMP runs the closure before step(), plain precision inside it); weights do not change
        # in between, so both see the same mask.
        for e in entries:
            if e.dynamic is not None and not e.fresh:
                e.mask = _where_mask(e.param, e.dynamic)
                e.fresh = True

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        raw = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        entries = [e for e in self._entries if not e.optimizers or id(raw) in e.optimizers]
        self._refresh(entries)
        backward = self._backward
        # Gradients a backward hook masked and nothing wrote since need no second pass.
        cold = [e for e in entries if backward is None or not backward.settled(e.param)]
        mask_gradients([e.param for e in cold], [self._kernel(e) for e in cold])
        _recheck_scaler(trainer, raw)
        every = max(trainer.log_every_n_steps, 1)  # type: ignore[attr-defined]  # set by Lightning's connector
        if self.log_fraction and trainer.loggers and trainer.global_step % every == 0:
            self._log_fractions(pl_module, entries)

    def _log_fractions(self, pl_module: L.LightningModule, entries: list[_Masked]) -> None:
        by_selector: dict[str, list[_Masked]] = {}
        for e in entries:
            by_selector.setdefault(e.selector, []).append(e)
        for e in entries:
            if e.dynamic is not None:  # a collective when sharded: every rank logs at the same steps
                e.frozen = count_masked(e.param, e.mask)  # type: ignore[arg-type]  # built in setup
        for selector, group in by_selector.items():
            total = sum(e.param.numel() for e in group)
            frozen = sum(e.frozen for e in group)
            pl_module.log(f"masked_fraction/{selector}", frozen / total, on_step=True, on_epoch=False)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if any(e.dynamic for e in self._entries):  # the summary's counts follow masks that change
            self._record_counts(pl_module)

    @override
    def cleanup(self, trainer: L.Trainer | None, pl_module: L.LightningModule | None) -> None:
        for e in self._entries:
            e.optimizers.clear()
        self._backward = None  # its hooks went with self.handles

    @override
    def technique_state(self) -> dict[str, Any]:
        # Full masks keyed by name. Sharded masks are gathered: a collective, and Lightning calls this on every
        # rank when it saves a checkpoint (ModelParallelStrategy's save is collective itself).
        static = {e.name: full_tensor(e.mask).detach().cpu() for e in self._entries if e.dynamic is None}  # type: ignore[arg-type]  # built
        return {"masks": static}

    @override
    def load_technique_state(self, state: dict[str, Any]) -> None:
        self._apply_loaded(dict(state.get("masks", {})))

    def _apply_loaded(self, masks: dict[str, Tensor]) -> None:
        static = {e.name: e for e in self._entries if e.dynamic is None}
        unknown = sorted(set(masks) - set(static))
        if unknown:
            rank_zero_warn(
                f"GradientMasking: the checkpoint holds masks for {preview(unknown)}, which this run does not mask."
            )
        for name, mask in masks.items():
            if name in static:
                e = static[name]
                mask = as_bool_mask(mask, name, e.param)
                e.frozen = count_masked(e.param, mask)
                # Every rank loaded the same checkpoint: each takes its own shard, without communication.
                e.mask = shard_like(mask, e.param, src_data_rank=None)


def _recheck_scaler(trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> None:
    """Let fp16 ``GradScaler`` judge the masked gradients, not the raw ones.

    The scaler looks for inf/NaN while unscaling, before this hook; an overflow only in masked (now zero)
    positions would skip the step and shrink the scale for nothing, at every step if it recurs. Re-check the
    optimizer's gradients (x * 1.0 is exact) and overwrite its verdict. Touches GradScaler internals through
    :mod:`lit_partial._compat`, which fails loudly if a future torch changes them.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    found_per_device = scaler_found_inf_per_device(scaler, optimizer)
    if not found_per_device:
        return
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    sharded = any(is_dtensor(g) for g in grads)
    grads = [local_tensor(g) for g in grads]
    for device, found in found_per_device.items():
        on_device = [g for g in grads if g.device == device and not g.is_sparse]
        found.zero_()
        if on_device:
            non_finite_check_and_unscale_(on_device, found, torch.ones((), device=device))
        if sharded and world_size() > 1:  # each rank saw its shard only: skip the step on all ranks or none
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)


def _describe(source: Any) -> Any:
    """Plain data that changes whenever the mask source does (a tensor by shape and content digest)."""
    if isinstance(source, Tensor):
        data = source.detach().to("cpu", torch.uint8).contiguous().numpy().tobytes()
        return {"tensor": list(source.shape), "sha1": hashlib.sha1(data).hexdigest()[:16]}
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, Path):
        return {"file": str(source)}
    return {"callable": getattr(source, "__qualname__", type(source).__name__)}


def _where_mask(param: Tensor, spec: Mapping[str, Any]) -> Tensor:
    """A ``where`` mask of ``param``'s current values; a sharded parameter's is computed on its local shard."""
    local = build_where_mask(local_tensor(param), spec["op"], spec["value"])
    if not is_dtensor(param):
        return local
    from torch.distributed.tensor import DTensor

    sharded: Any = param
    # No communication: each rank wraps its own shard, laid out like the parameter's.
    return DTensor.from_local(
        local, sharded.device_mesh, sharded.placements, run_check=False, shape=param.shape, stride=param.stride()
    )
