"""Element-wise gradient masks that truly freeze the masked elements, for any optimizer.

Zeroing ``.grad`` where a mask is 0 is exact only for plain SGD: momentum, Adam moments and weight
decay still move the element (SGD momentum 0.9 drifts 2.05 in 5 steps; AdamW 0.31). So there are
two tools:

* :func:`mask_gradients` zeroes masked gradient entries, exactly, even where they are NaN or inf.
* :func:`guard_masked_elements` hooks a ``torch.optim.Optimizer`` so that every ``step()`` leaves
  masked elements bit-identical, whatever the optimizer does: a pre-step hook keeps the masked
  values (:func:`snapshot_masked`), a post-step hook writes them back (:func:`restore_masked`).

And one for speed: :func:`floor_second_moments` keeps the second moments of masked elements (Adam's
``exp_avg_sq`` and its kin) at a tiny normal value instead of exactly 0. On x86 CPUs ``sqrt`` of exact zeros
and any arithmetic on denormals take a slow path (measured, torch 2.13, one AVX-512 thread, 2M floats:
``sqrt`` of zeros 13.5 ms vs 1.0 ms of ones; denormals 33 ms), so masking 90% of a weight made
``AdamW.step`` 2-3x slower; with the floor it costs what a dense step costs. Gradients, parameter
values and first moments are untouched.

Masks are ``torch.bool`` tensors that broadcast to their parameter: ``True`` = may change.

Sharded parameters (FSDP2's ``DTensor`` s) take masks sharded the same way (see
:func:`lit_partial.distributed.shard_like`); every kernel then works on the local shards, with no
communication, since masking is element-wise. Only :func:`count_masked` gathers (it counts over all ranks).

The kernels select bits, never compute: tensors are viewed as same-width integers and multiplied by
the mask viewed as 0/1 ``int8``. ``x * 1`` and ``x * 0`` are exact on integers, so NaN payloads, inf
and ``-0.0`` survive or vanish bit for bit. (``grad * mask`` on floats would keep ``NaN * 0 = NaN``,
and ``torch.where`` runs several times slower than a copy on CPU.)

Memory: masks cost 1 byte per element (less for structured masks kept in broadcast shape); the
guard keeps one snapshot buffer per guarded parameter (the size of the parameter, like one more
optimizer moment), reused every step and freed by ``handle.remove()``. Allocating it per step instead
costs more than the copy itself on CPU (measured: ``clone`` 2.6x a copy into an existing buffer), and
re-reading it every step is skipped while the parameter was not written in place (see
:func:`guard_masked_elements`), so a static-mask step costs one gradient pass and one restore pass.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2, 2))
    >>> keep = torch.tensor([[True, False], [True, True]])
    >>> opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.1)
    >>> handle = guard_masked_elements(opt, lambda: [(w, keep)])
    >>> for _ in range(3):
    ...     w.grad = torch.full((2, 2), float("nan"))
    ...     mask_gradients([w], [keep])
    ...     w.grad[keep] = 1.0
    ...     opt.step()
    >>> w[0, 1].item(), bool((w[keep] != 1).all())
    (1.0, True)
    >>> handle.remove()
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from lit_partial._compat import foreach_mul_, version_counter
from lit_partial.attach import Handle, Handles
from lit_partial.distributed import full_tensor, local_tensor
from lit_partial.errors import UsageError

__all__ = [
    "count_masked",
    "floor_second_moments",
    "guard_masked_elements",
    "kernel_mask",
    "mask_gradients",
    "restore_masked",
    "second_moment_keys",
    "snapshot_masked",
]

_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

MaskPairs = Callable[[], Sequence[tuple[Tensor, Tensor]]]


def _bits(t: Tensor) -> Tensor:
    # Viewing as same-width ints makes the 0/1 multiply a pure bit selection (no float rounding, NaN*0).
    return t.view(_SAME_WIDTH_INT[t.element_size()])


def _as_01(mask: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask.view(torch.int8)
    if mask.is_floating_point() or mask.is_complex():
        return (mask != 0).view(torch.int8)
    return mask  # integer masks hold 0/1 (kernel_mask's form): used as they are


def _fit(keep: Tensor, bits: Tensor) -> Tensor:
    # A kernel mask made for a wider parameter than this tensor (e.g. a bf16 gradient of an fp32 weight) would
    # promote the product past the output's width: narrow it (0/1 survive any integer width).
    return keep.to(bits.dtype) if keep.element_size() > bits.element_size() else keep


def kernel_mask(mask: Tensor, like: Tensor, wide: bool = False) -> Tensor:
    """``mask`` as the 0/1 integers the bit-select kernels multiply by, on ``like``'s device (sharded: its shard).

    By default ``int8``: a view of a bool mask (no copy), 1 byte per element. ``wide=True`` gives an integer as wide
    as ``like``'s elements (``int32`` for ``float32``). On CPU that makes the kernels alone 1.1-1.7x faster (a
    multiply of equal dtypes vectorizes, ``int32 * int8`` converts element by element) at 4x the mask bytes:
    ``GradientMasking`` uses it for strict masking on CPU (faster steps measured), the bool elsewhere
    (``python -m benchmarks --only masking``). Structured masks keep their broadcast shape.

    Example:
        >>> kernel_mask(torch.tensor([True, False]), torch.zeros(2)).tolist()
        [1, 0]
        >>> kernel_mask(torch.tensor([True, False]), torch.zeros(2), wide=True).dtype
        torch.int32
    """
    local = local_tensor(mask)
    keep = (local if local.dtype == torch.bool else local != 0).to(local_tensor(like).device)
    return keep.to(_SAME_WIDTH_INT[like.element_size()]) if wide else keep.view(torch.int8)


def mask_gradients(params: Iterable[Tensor], masks: Iterable[Tensor]) -> None:
    """Set ``param.grad`` to exactly ``+0.0`` wherever its mask is 0, in place (NaN and inf included).

    Parameters without a gradient are skipped. This alone freezes masked elements only under plain SGD
    (no momentum, no weight decay); for any other optimizer add :func:`guard_masked_elements`.

    Args:
        params: Parameters whose ``.grad`` is masked.
        masks: One mask per parameter, broadcasting to it: bool (fastest), 0/1 numbers, or :func:`kernel_mask`'s
            forms. Integer masks must hold only 0 and 1; they are used as they are.

    Raises:
        TypeError: If a gradient is sparse (e.g. ``nn.Embedding(sparse=True)``).

    Example:
        >>> p = torch.zeros(3, requires_grad=True)
        >>> p.grad = torch.tensor([float("nan"), float("inf"), 2.0])
        >>> mask_gradients([p], [torch.tensor([False, False, True])])
        >>> p.grad
        tensor([0., 0., 2.])
    """
    grads, keeps = [], []
    for param, mask in zip(params, masks, strict=True):
        grad = param.grad
        if grad is None:
            continue
        grad, mask = local_tensor(grad), local_tensor(mask)  # sharded: this rank's shards, element for element
        if grad.is_sparse:
            raise UsageError(
                "mask_gradients got a sparse gradient; masks need dense gradients. "
                "Fix: build the embedding with sparse=False."
            )
        grads.append(_bits(grad))
        keeps.append(_fit(_as_01(mask), grads[-1]).to(grad.device, non_blocking=True))
    if grads:
        with torch.no_grad():
            # One C++ call for all tensors (a fused kernel where dtypes and shapes allow it).
            foreach_mul_(grads, keeps)


def snapshot_masked(
    params: Sequence[Tensor], masks: Sequence[Tensor], out: Sequence[Tensor] | None = None
) -> list[Tensor]:
    """Copies of ``params`` holding their values where the mask is 0 and zeros where it is 1.

    Pass the result to :func:`restore_masked` after the optimizer step.

    Args:
        params: The parameters to keep.
        masks: Their masks (True / 1 = may change).
        out: Buffers shaped like ``params`` to write into; reusing them across steps avoids allocating
            (and, on CPU, page-faulting) a parameter-sized tensor per step, which costs more than the copy.
    """
    params = [local_tensor(p) for p in params]
    buffers = [local_tensor(b) for b in out] if out is not None else [torch.empty_like(p) for p in params]
    with torch.no_grad():
        for param, mask, snapshot in zip(params, masks, buffers, strict=True):
            _snapshot_into(param, _frozen_01(local_tensor(mask)), snapshot)
    return buffers


def _snapshot_into(param: Tensor, frozen_01: Tensor, snapshot: Tensor) -> None:
    torch.mul(_bits(param), frozen_01, out=_bits(snapshot))


def _frozen_01(mask: Tensor) -> Tensor:
    return torch.logical_not(mask).view(torch.int8)


def restore_masked(params: Sequence[Tensor], masks: Sequence[Tensor], snapshots: Sequence[Tensor]) -> None:
    """Write the values :func:`snapshot_masked` kept back into the masked elements, bit for bit, in place.

    Elements where the mask is 1 keep their current value.
    """
    with torch.no_grad():
        for param, mask, snapshot in zip(params, masks, snapshots, strict=True):
            bits = _bits(local_tensor(param))
            # snapshot is 0 where mask is 1 and param*mask is 0 where mask is 0: one pass, no overlap.
            torch.addcmul(_bits(local_tensor(snapshot)), bits, _as_01(local_tensor(mask)), out=bits)


def count_masked(param: Tensor, mask: Tensor) -> int:
    """How many elements of ``param`` the (broadcasting) ``mask`` freezes.

    A sharded ``mask`` (DTensor) is gathered first: a collective, so call it on every rank.

    Example:
        >>> count_masked(torch.zeros(4, 3), torch.tensor([[True], [False], [False], [True]]))
        6
    """
    mask = full_tensor(mask)
    kept = int((mask if mask.dtype == torch.bool else mask != 0).sum()) * (param.numel() // max(mask.numel(), 1))
    return param.numel() - kept


def guard_masked_elements(optimizer: Optimizer, masks: MaskPairs, reuse_snapshots: bool = True) -> Handles:
    """Make every ``optimizer.step()`` leave masked elements bit-identical, for any optimizer.

    A step pre-hook calls ``masks()`` for the current ``(param, mask)`` pairs and keeps the masked
    values of the parameters this optimizer holds; a post-hook writes them back. Momentum, Adam moments
    and weight decay may still update the optimizer *state* of masked elements; their *values* never
    change. Masks may change between steps (``masks()`` is called at every step). If the step raises
    or is skipped (e.g. ``GradScaler`` found inf), nothing is restored and nothing was changed.

    Args:
        optimizer: A ``torch.optim.Optimizer`` (not a Lightning wrapper: pass ``trainer.optimizers[i]``).
        masks: Called once per step, returns ``(param, mask)`` pairs: bool masks (read through an ``int8`` view,
            no copy), or :func:`kernel_mask`'s forms (read as they are).
        reuse_snapshots: Skip re-reading a parameter whose mask is the same object as last step and which
            was not written in place since the last restore (PyTorch's version counter and storage pointer
            unchanged): its masked values are still in the buffer. This halves the strict cost for static
            masks. Writes through ``param.data`` bypass the version counter, so such a write to a masked
            element between steps would be undone; pass False if your code does that (or write under
            ``torch.no_grad()`` without ``.data``).

    Returns:
        A :class:`~lit_partial.attach.Handles` whose ``remove()`` detaches both hooks and frees the buffers.
    """
    slots: dict[int, _Slot] = {}  # id(param) -> its snapshot buffer and what the buffer holds
    pending: list[list[tuple[Tensor, _Slot]]] = []

    def before_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
        owned = {id(p) for group in opt.param_groups for p in group["params"]}
        guarded = []
        with torch.no_grad():
            for param, mask in masks():
                if id(param) in owned:
                    slot = slots.get(id(param))
                    if slot is None:
                        slot = slots[id(param)] = _Slot()
                    slot.take(param, mask, reuse_snapshots)
                    guarded.append((param, slot))
        pending[:] = [guarded]

    def after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
        if pending:
            with torch.no_grad():
                for param, slot in pending.pop():
                    slot.put_back(param)

    return Handles(
        [
            optimizer.register_step_pre_hook(before_step),
            optimizer.register_step_post_hook(after_step),
            Handle(slots.clear),
        ]
    )


class _Slot:
    """One guarded parameter: a reused snapshot buffer and the (mask, version, storage) it was taken under.

    Masked values never change, so after a restore the buffer still holds them; the next step re-reads the
    parameter only if the mask changed or the parameter was written in place since (its version counter moved,
    e.g. ``load_state_dict``, or its storage was swapped). That halves the strict cost for static masks.
    Sharded parameters and masks are handled through their local shards (the buffer holds this rank's shard).
    """

    def __init__(self) -> None:
        self.buffer: Tensor | None = None
        self.source: Tensor | None = None  # the mask object as given (identity tells a new mask)
        self.keep: Tensor | None = None  # 0/1 integers on the parameter's device (kernel_mask's form)
        self.frozen: Tensor | None = None  # 1/0 int8, kept only while every step re-reads the parameter
        self.stamp: tuple[int, int] | None = None

    def take(self, param: Tensor, mask: Tensor, reuse: bool) -> None:
        param = local_tensor(param)
        if mask is not self.source:
            local = local_tensor(mask)
            keep = local if _is_kernel_form(local, param) else kernel_mask(local, param)
            self.source, self.keep, self.frozen, self.stamp = mask, keep, None, None
        buf = self.buffer
        if buf is None or buf.shape != param.shape or buf.dtype != param.dtype or buf.device != param.device:
            buf, self.stamp = torch.empty_like(param), None
            self.buffer = buf
        if not reuse or self.stamp != (version_counter(param), param.data_ptr()):
            frozen = self.frozen
            if frozen is None:
                frozen = torch.logical_not(self.keep).view(torch.int8)  # type: ignore[arg-type]  # set above
            self.frozen = None if reuse else frozen  # a rare re-read (new mask, a load) keeps no buffer for it
            _snapshot_into(param, frozen, buf)

    def put_back(self, param: Tensor) -> None:
        param = local_tensor(param)
        bits = _bits(param)
        # The buffer is 0 where the mask is 1 and param*mask is 0 where it is 0: one pass, no overflow.
        torch.addcmul(_bits(self.buffer), bits, _fit(self.keep, bits), out=bits)  # type: ignore[arg-type]  # take()
        self.stamp = (version_counter(param), param.data_ptr())


def _is_kernel_form(mask: Tensor, like: Tensor) -> bool:
    return mask.device == like.device and mask.dtype in (torch.int8, _SAME_WIDTH_INT[like.element_size()])


#: The floor :func:`floor_second_moments` raises masked second moments to: 2**-100 (about 7.9e-31). Its square
#: root (8.9e-16) is 1e-7 of Adam's default ``eps``, so an element unmasked later starts as if from zero.
SECOND_MOMENT_FLOOR = 2.0**-100
_NORMAL_MIN = 2.0**-125  # 2x float32's smallest normal: the floor is raised again before decaying below this

# torch optimizers whose step divides by the square root of a running second moment that a zero gradient
# keeps at exactly 0: (class, state keys, decay of that moment per step read from the param group).
_SQRT_STATES: tuple[tuple[type[Optimizer], tuple[str, ...], Callable[[dict[str, Any]], float]], ...] = (
    (torch.optim.Adam, ("exp_avg_sq", "max_exp_avg_sq"), lambda g: float(g["betas"][1])),  # AdamW too
    (torch.optim.NAdam, ("exp_avg_sq",), lambda g: float(g["betas"][1])),
    (torch.optim.RAdam, ("exp_avg_sq",), lambda g: float(g["betas"][1])),
    (torch.optim.RMSprop, ("square_avg",), lambda g: float(g["alpha"])),
    (torch.optim.Adagrad, ("sum",), lambda g: 1.0),  # a sum: never decays
)


def second_moment_keys(optimizer: Optimizer) -> tuple[str, ...]:
    """The state keys of ``optimizer``'s square-rooted second moments, or ``()`` if it keeps none.

    Example:
        >>> second_moment_keys(torch.optim.AdamW([torch.zeros(1, requires_grad=True)]))
        ('exp_avg_sq', 'max_exp_avg_sq')
        >>> second_moment_keys(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9))
        ()
    """
    for cls, keys, _ in _SQRT_STATES:
        if isinstance(optimizer, cls):
            return keys
    return ()


def _refresh_period(decay: float, floor: float) -> float:
    """Steps after which ``floor * decay**steps`` would drop below the normal range (inf: never)."""
    if decay >= 1.0:
        return math.inf
    if decay <= 0.0:
        return 1.0
    return max(1.0, math.floor(math.log(_NORMAL_MIN / floor) / math.log(decay)))


def floor_second_moments(optimizer: Optimizer, masks: MaskPairs, floor: float = SECOND_MOMENT_FLOOR) -> Handles:
    """Keep the second moments of masked elements at least ``floor`` (never 0, never denormal), for speed.

    A masked element's gradient is exactly 0, so Adam's ``exp_avg_sq`` (and RMSprop's ``square_avg``,
    Adagrad's ``sum``, ...) stays exactly 0 there, and on x86 CPUs ``sqrt(0)`` takes a slow path: AdamW's
    step ran 2-3x slower with 90% of a weight masked. A step post-hook raises the masked positions of those
    moments to ``floor`` where they are below it, at the step that creates them (the parameter's step 1) and
    again every ``N`` steps, ``N`` chosen from the moment's decay (``beta2``, ``alpha``) so that
    ``floor * decay**N`` stays a normal float (``N`` = 17,300 for ``beta2=0.999``; Adagrad's sum never
    decays). The schedule follows each parameter's own step count, read once from the optimizer's state,
    so a resumed run refreshes at the same steps as an uninterrupted one.

    What changes: only the second moment of masked elements, raised to at most ``floor`` (default 2**-100,
    whose square root is 1e-7 of Adam's ``eps``). Gradients (so gradient clipping), first moments and every
    unmasked element's state and value are untouched. A masked element whose first moment is 0 (its gradient
    was always masked) still gets an update of exactly 0; one that moves anyway (``strict=False`` with Adam's
    L2 ``weight_decay``, say) moves by the same amount to within 1e-7 of it, and ``strict=True`` restores it
    regardless. Optimizers without a square-rooted second moment (SGD, Adamax, Adadelta, ...) get no hook.
    ``float16`` moments are skipped (the floor is below their normal range).

    Args:
        optimizer: A ``torch.optim`` optimizer.
        masks: Called after each step, returns the ``(param, bool_mask)`` pairs in force for that step
            (True = may change); pairs of parameters this optimizer does not hold are ignored.
        floor: The value masked second moments are raised to.

    Returns:
        A handle whose ``remove()`` detaches the hook.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> keep = torch.tensor([True, True, False, False])
        >>> opt = torch.optim.Adam([w], lr=0.1)
        >>> handle = floor_second_moments(opt, lambda: [(w, keep)])
        >>> w.grad = torch.tensor([1.0, 1.0, 0.0, 0.0])
        >>> opt.step()
        >>> opt.state[w]["exp_avg_sq"][2:].tolist() == [2.0**-100, 2.0**-100]  # masked: the floor, not 0
        True
        >>> opt.state[w]["exp_avg"][2:].tolist(), w[2:].tolist()  # untouched: no update
        ([0.0, 0.0], [1.0, 1.0])
        >>> handle.remove()
    """
    keys = second_moment_keys(optimizer)
    if not keys:
        return Handles()
    decay = next(rule for cls, _, rule in _SQRT_STATES if isinstance(optimizer, cls))
    counters: dict[int, tuple[Tensor, int]] = {}  # id(param) -> (its moment tensor last seen, its step count)

    def after_step(opt: Optimizer, args: Any, kwargs: Any) -> None:
        group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
        for param, mask in masks():
            group = group_of.get(id(param))
            state = opt.state.get(param) if group is not None else None
            if not state or param.grad is None:
                continue  # not this optimizer's, or not stepped this time (no gradient: no state update)
            moment = state.get(keys[0])
            if not isinstance(moment, Tensor):
                continue
            seen = counters.get(id(param))
            if seen is not None and seen[0] is moment:
                step = seen[1] + 1
            else:  # new state (first step, load_state_dict, a reset): take the optimizer's own count
                step = int(state["step"]) if "step" in state else 1
            counters[id(param)] = (moment, step)
            period = _refresh_period(decay(group), floor)  # type: ignore[arg-type]  # not None: state found
            if (step - 1) % period == 0:
                _raise_masked(state, keys, param, mask, floor)

    return Handles([optimizer.register_step_post_hook(after_step), Handle(counters.clear)])


def _raise_masked(state: dict[str, Any], keys: Sequence[str], param: Tensor, mask: Tensor, floor: float) -> None:
    # Sharded (FSDP2): parameter, mask and moments are DTensors sharded alike; work on this rank's shards.
    mask = local_tensor(mask)
    frozen = torch.logical_not(mask if mask.dtype == torch.bool else mask != 0).to(local_tensor(param).device)
    with torch.no_grad():
        for key in keys:
            moment = state.get(key)
            if not isinstance(moment, Tensor) or moment.shape != param.shape or not moment.is_floating_point():
                continue
            if torch.finfo(moment.dtype).tiny > _NORMAL_MIN:
                continue  # float16: the floor is not a normal number there
            local = local_tensor(moment)
            # Only masked positions; a select, so every other element keeps its exact bits.
            torch.where(frozen, local.clamp_min(floor), local, out=local)
