"""Mask builders: turn a small spec (plain data) into a boolean mask for one parameter.

A mask is a ``torch.bool`` tensor that broadcasts to its parameter: ``True`` (1) = the element may
change, ``False`` (0) = it must not. Structured masks keep their broadcast shape (a row mask of a
``(1000, 64)`` embedding is stored as ``(1000, 1)``), so they cost one byte per row, not per element.

==========================================================  =============================================
spec                                                        elements that may change
==========================================================  =============================================
``{"kind": "random", "keep": f, "seed": s}``                exactly ``round(f * numel)`` elements, drawn
                                                            from a generator seeded by ``(s, name)``:
                                                            the same on every rank and every run
``{"kind": "magnitude", "keep": f, "largest": true}``       the ``f`` largest (or smallest) ``|w|``
``{"kind": "rows", "index": [...]}``                        the listed indices of dim 0 (``-1``: the last)
``{"kind": "columns", "index": [...]}``                     the listed indices of dim 1
``{"kind": "channels", "index": [...]}``                    the listed output channels (dim 0) of every
                                                            selected parameter (conv weight, BN, bias)
``{"kind": "where", "op": ">", "value": 0.0}``              elements where ``w op value`` holds now;
                                                            recomputed from the weights at every step
==========================================================  =============================================

Example:
    >>> import torch
    >>> w = torch.tensor([[0.5, -1.0], [2.0, -0.1]])
    >>> build_mask({"kind": "where", "op": ">", "value": 0.0}, "w", w)
    tensor([[ True, False],
            [ True, False]])
    >>> build_mask({"kind": "rows", "index": [1]}, "w", w).shape
    torch.Size([2, 1])
    >>> int(build_mask({"kind": "random", "keep": 0.5, "seed": 0}, "w", w).sum())
    2
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lit_partial.conditions import COMPARISONS
from lit_partial.errors import MaskError

__all__ = [
    "MASK_FORMS",
    "MASK_KINDS",
    "WHERE_OPS",
    "MaskError",
    "MaskSource",
    "as_bool_mask",
    "build_index_mask",
    "build_magnitude_mask",
    "build_mask",
    "build_random_mask",
    "build_where_mask",
    "check_binary",
    "check_mask_source",
    "is_dynamic_spec",
    "resolve_mask_source",
    "validate_mask_spec",
]

#: Every builder kind, with the keys it takes (required first).
MASK_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "random": (("keep",), ("seed",)),
    "magnitude": (("keep",), ("largest",)),
    "rows": (("index",), ()),
    "columns": (("index",), ()),
    "channels": (("index",), ()),
    "where": (("op", "value"), ()),
}

WHERE_OPS = COMPARISONS  # the same comparisons as statistic conditions

_INDEX_DIM = {"rows": 0, "columns": 1, "channels": 0}

# The mapping (a builder spec) comes first: argument parsers that read the annotation (LightningCLI's
# jsonargparse) try the members in order, and `str` first would turn a spec written in YAML into its repr.
MaskSource = Mapping[str, Any] | str | os.PathLike[str] | Tensor | Callable[[str, Tensor], Tensor]

MASK_FORMS = (
    "a 0/1 tensor broadcasting to the parameter, a path to a .pt file holding {name: tensor}, a builder spec "
    "such as {'kind': 'random', 'keep': 0.1, 'seed': 0}, or a callable (name, param) -> mask"
)


def _kinds() -> str:
    return ", ".join(repr(k) for k in MASK_KINDS)


def validate_mask_spec(spec: Mapping[str, Any], *, where: str = "mask spec") -> dict[str, Any]:
    """Check a builder spec without a model and return it as a plain dict with defaults filled in.

    Args:
        spec: A dict with ``"kind"`` and that kind's keys (see the module docstring).
        where: Names the spec in error messages (e.g. the selector it belongs to).

    Raises:
        MaskError: Unknown kind (listing the valid ones), missing or unknown keys, ``keep`` outside
            ``(0, 1]``, an unknown ``op``, or a malformed ``index``.
    """
    spec = dict(spec)
    kind = spec.get("kind")
    if kind not in MASK_KINDS:
        raise MaskError(f"{where}: unknown mask kind {kind!r}; valid kinds are {_kinds()}.")
    required, optional = MASK_KINDS[kind]
    missing = [k for k in required if k not in spec]
    if missing:
        raise MaskError(f"{where}: kind {kind!r} needs {missing}; e.g. {_example(kind)}.")
    unknown = sorted(set(spec) - {"kind", *required, *optional})
    if unknown:
        raise MaskError(f"{where}: kind {kind!r} takes {[*required, *optional]}, not {unknown}.")
    if kind in ("random", "magnitude"):
        keep = spec["keep"]
        if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0.0 < keep <= 1.0:
            raise MaskError(f"{where}: keep={keep!r} must be a fraction in (0, 1] of elements that may change.")
        spec["keep"] = float(keep)
    if kind == "random":
        seed = spec.setdefault("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise MaskError(f"{where}: seed={seed!r} must be a non-negative int.")
    if kind == "magnitude":
        largest = spec.setdefault("largest", True)
        if not isinstance(largest, bool):
            raise MaskError(f"{where}: largest={largest!r} must be true (keep the largest |w|) or false.")
    if kind in _INDEX_DIM:
        index = spec["index"]
        ints = isinstance(index, Sequence) and not isinstance(index, str) and len(index) > 0
        if not ints or not all(isinstance(i, int) and not isinstance(i, bool) for i in index):
            raise MaskError(
                f"{where}: index={index!r} must be a non-empty list of ints, e.g. [0, 5] (negative ones count from "
                "the end: [-2, -1] are the last two rows, e.g. the tokens resize_token_embeddings added)."
            )
        spec["index"] = sorted(set(index))
    if kind == "where":
        if spec["op"] not in WHERE_OPS:
            raise MaskError(f"{where}: op={spec['op']!r} is not one of {list(WHERE_OPS)}.")
        value = spec["value"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise MaskError(
                f"{where}: value={value!r} must be a number, and finite (NaN compares false everywhere), e.g. 0.0."
            )
        spec["value"] = float(value)
    return spec


def _example(kind: str) -> str:
    return {
        "random": "{'kind': 'random', 'keep': 0.1, 'seed': 0}",
        "magnitude": "{'kind': 'magnitude', 'keep': 0.1, 'largest': True}",
        "where": "{'kind': 'where', 'op': '>', 'value': 0.0}",
    }.get(kind, f"{{'kind': '{kind}', 'index': [0, 3]}}")


def is_dynamic_spec(spec: Any) -> bool:
    """True for specs whose mask depends on the current weights and is recomputed every step."""
    return isinstance(spec, Mapping) and spec.get("kind") == "where"


def _salted_seed(seed: int, name: str) -> int:
    # crc32 is stable across processes and Python versions (unlike hash()), so every rank draws alike.
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63 - 1)


def _keep_count(numel: int, keep: float) -> int:
    return min(numel, max(1, round(keep * numel)))


def build_random_mask(shape: Sequence[int], keep: float, seed: int = 0, name: str = "") -> Tensor:
    """A mask letting exactly ``round(keep * numel)`` (at least 1) random elements change.

    The draw uses its own CPU generator seeded by ``(seed, name)``, never the global RNG, so every
    rank and every run builds the same mask, and parameters with different names get different masks.

    Example:
        >>> a = build_random_mask((4, 5), keep=0.25, seed=3, name="w")
        >>> int(a.sum()), torch.equal(a, build_random_mask((4, 5), keep=0.25, seed=3, name="w"))
        (5, True)
    """
    numel = math.prod(shape)
    generator = torch.Generator().manual_seed(_salted_seed(seed, name))
    chosen = torch.randperm(numel, generator=generator)[: _keep_count(numel, keep)]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[chosen] = True
    return mask.view(tuple(shape))


def build_magnitude_mask(weight: Tensor, keep: float, largest: bool = True) -> Tensor:
    """A mask letting the ``keep`` fraction of elements with the largest (or smallest) ``|w|`` change.

    Example:
        >>> build_magnitude_mask(torch.tensor([0.1, -3.0, 2.0, 0.5]), keep=0.5)
        tensor([False,  True,  True, False])
    """
    flat = weight.detach().abs().flatten()
    chosen = torch.topk(flat, _keep_count(flat.numel(), keep), largest=largest, sorted=False).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=weight.device)
    mask[chosen] = True
    return mask.view(weight.shape)


def build_index_mask(shape: Sequence[int], index: Sequence[int], dim: int, name: str = "parameter") -> Tensor:
    """A mask letting the listed indices along ``dim`` change, in broadcast shape (size 1 elsewhere).

    Negative indices count from the end, as in Python (``-1`` is the last row).

    Raises:
        MaskError: If the parameter has no dimension ``dim`` or an index is out of range.

    Example:
        >>> build_index_mask((3, 2), [0, -1], dim=0)
        tensor([[ True],
                [False],
                [ True]])
    """
    if len(shape) <= dim:
        raise MaskError(
            f"{name} has shape {tuple(shape)}: no dim {dim} to index; select 2-D or larger parameters "
            f"(e.g. '*.weight') for columns, or use rows."
        )
    size = shape[dim]
    bad = [i for i in index if not -size <= i < size]
    if bad:
        raise MaskError(f"{name}: index {bad} out of range for dim {dim} of size {size} (shape {tuple(shape)}).")
    view = [1] * len(shape)
    view[dim] = size
    mask = torch.zeros(size, dtype=torch.bool)
    mask[[i % size for i in index]] = True
    return mask.view(view)


def build_where_mask(weight: Tensor, op: str, value: float) -> Tensor:
    """A mask letting the elements with ``weight op value`` change (e.g. ``">", 0.0``: positive weights).

    Example:
        >>> build_where_mask(torch.tensor([-1.0, 0.0, 2.0]), ">=", 0.0)
        tensor([False,  True,  True])
    """
    return WHERE_OPS[op](weight.detach(), value)  # type: ignore[no-any-return]  # operator.* is untyped


def build_mask(spec: Mapping[str, Any], name: str, param: Tensor) -> Tensor:
    """Build the boolean mask of ``param`` (named ``name``) from a spec checked by :func:`validate_mask_spec`."""
    spec = validate_mask_spec(spec, where=f"mask of {name}")
    kind = spec["kind"]
    if kind == "random":
        return build_random_mask(param.shape, spec["keep"], spec["seed"], name).to(param.device)
    if kind == "magnitude":
        return build_magnitude_mask(param, spec["keep"], spec["largest"])
    if kind == "where":
        return build_where_mask(param, spec["op"], spec["value"])
    return build_index_mask(param.shape, spec["index"], _INDEX_DIM[kind], name).to(param.device)


def as_bool_mask(mask: Any, name: str, param: Tensor) -> Tensor:
    """Validate a user mask against its parameter and return it as a bool tensor on the parameter's device.

    Args:
        mask: A tensor (bool, or numbers that are all 0 or 1) that broadcasts to ``param``.
        name: The parameter's name, for messages.
        param: The parameter the mask belongs to.

    Raises:
        MaskError: If ``mask`` is not a tensor, holds values other than 0/1, or does not broadcast.
    """
    if not isinstance(mask, Tensor):
        raise MaskError(f"mask of {name} is a {type(mask).__name__}; expected a tensor of 0/1 values.")
    mask = check_binary(mask, f"mask of {name}")
    try:
        broadcast = torch.broadcast_shapes(mask.shape, param.shape)  # type: ignore[no-untyped-call]  # unannotated in torch
    except RuntimeError:
        broadcast = None
    if broadcast != param.shape:
        raise MaskError(
            f"mask of {name} has shape {tuple(mask.shape)}, which does not broadcast to the parameter's shape "
            f"{tuple(param.shape)}; give a mask of shape {tuple(param.shape)} (or one with size-1 dims)."
        )
    return mask.to(param.device)  # type: ignore[no-any-return]  # check_binary's result is a Tensor


def check_binary(mask: Tensor, what: str) -> Tensor:
    """Return ``mask`` as bool after checking every value is 0 or 1.

    Raises:
        MaskError: Naming a few offending values.
    """
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or mask.is_sparse:
        raise MaskError(f"{what} must be a dense real tensor of 0/1 values, got dtype {mask.dtype}.")
    bad = mask[(mask != 0) & (mask != 1)]
    if bad.numel():
        raise MaskError(
            f"{what} holds values other than 0/1 (e.g. {bad.flatten()[:3].tolist()}); a mask says which elements may "
            "change (1) and which must not (0). Fix: pass (scores > threshold) or a bool tensor."
        )
    return mask != 0


def check_mask_source(selector: str, source: Any) -> Any:
    """Validate a mask source of ``masks[selector]`` without a model (values, spec keys, file existence).

    Returns the source normalized: a bool tensor, a ``Path``, a spec with defaults, or the callable.

    Raises:
        MaskError: Naming the selector, the bad value and the accepted forms.
    """
    where = f"masks[{selector!r}]"
    if isinstance(source, Tensor):
        return check_binary(source.detach(), where)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise MaskError(
                f"{where}: mask file {str(path)!r} does not exist; save one with torch.save({{name: mask}})."
            )
        return path
    if isinstance(source, Mapping):
        return validate_mask_spec(source, where=where)
    if callable(source):
        return source
    raise MaskError(f"{where} is a {type(source).__name__}; expected {MASK_FORMS}.")


def resolve_mask_source(selector: str, source: Any, name: str, param: Tensor) -> Tensor:
    """Build the bool mask of parameter ``name`` from a static source checked by :func:`check_mask_source`.

    Raises:
        MaskError: If a file lacks ``name``, or the mask does not broadcast or is not 0/1.
    """
    if isinstance(source, Path):
        try:
            stored = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:
            raise MaskError(
                f"masks[{selector!r}]: {str(source)!r} is not a torch-saved mask file ({type(err).__name__}); save one "
                "with torch.save({parameter_name: mask_tensor}, path)."
            ) from err
        if not isinstance(stored, Mapping) or name not in stored:
            keys = sorted(stored)[:5] if isinstance(stored, Mapping) else type(stored).__name__
            raise MaskError(
                f"masks[{selector!r}]: file {str(source)!r} has no mask for parameter {name!r} (it holds {keys}); "
                "save a dict keyed by parameter name."
            )
        return as_bool_mask(stored[name], name, param)
    if isinstance(source, Mapping):
        return build_mask(source, name, param)
    if callable(source) and not isinstance(source, Tensor):
        with torch.no_grad():
            result = source(name, param)
        return as_bool_mask(result, name, param)
    return as_bool_mask(source, name, param)
