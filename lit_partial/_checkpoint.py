"""The record every technique writes into its checkpoint state, and the checks made with it on resume.

A low layer: both :class:`~lit_partial.callbacks.base.Technique` (which writes the record) and
:class:`~lit_partial.PartialBackpropMixin` (which checks a checkpoint when a run has no technique left) import it,
so the mixin never reaches up into the callbacks. Techniques are recognised by what they expose
(:class:`Recorded`), not by their class.

The persisted configuration is the validated user spec as plain data. Checkpoints written before it was (their
states keyed, and their configurations recorded, with ``repr()`` of internal dataclasses) still resume: a
technique gives that older form as ``legacy_config()``, and :func:`claim_legacy_states` moves such a state to the
technique's current ``state_key`` before Lightning hands the states out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any, Protocol, runtime_checkable

from lightning.pytorch.utilities import rank_zero_warn

from lit_partial.errors import CheckpointMismatchError

__all__ = [
    "MARK",
    "Recorded",
    "check_checkpoint_techniques",
    "claim_legacy_states",
    "differences",
    "is_technique",
    "jsonable",
    "state_key",
]

MARK = "lit_partial"  # key of the technique record inside each technique's saved state


def jsonable(value: Any) -> Any:
    """``value`` as JSON-able plain data (tuples -> lists, unknown objects -> their repr), for exact comparison."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


def state_key(kind: str, identity: Mapping[str, Any] | None) -> str:
    """A technique's ``state_key``: its class name, followed by its identity when it has one (as Lightning's own)."""
    return kind + (repr(jsonable(identity)) if identity else "")


@runtime_checkable
class Recorded(Protocol):
    """What a technique exposes for the checkpoint checks (:class:`~lit_partial.callbacks.base.Technique` does)."""

    accept_config_change: bool

    @property
    def state_key(self) -> str: ...

    @property
    def legacy_state_key(self) -> str | None: ...

    def config(self) -> dict[str, Any]: ...

    def technique_record(self) -> dict[str, Any]: ...


def is_technique(callback: Any) -> bool:
    """Whether ``callback`` writes a technique record (duck-typed: no import of the callbacks)."""
    return isinstance(callback, Recorded)


def differences(saved: Any, current: Any) -> str:
    """A short description of how two configurations differ ('' if they do not)."""
    if saved == current:
        return ""
    if isinstance(saved, dict) and isinstance(current, dict):
        parts = [
            f"{key}: {json.dumps(saved.get(key))} -> {json.dumps(current.get(key))}"
            for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)
        ]
        return "; ".join(parts)
    return f"{json.dumps(saved)} -> {json.dumps(current)}"


def claim_legacy_states(checkpoint: MutableMapping[str, Any], techniques: Sequence[Recorded]) -> None:
    """Move each state saved under a technique's legacy ``state_key`` to its current one (in place).

    Call before Lightning hands the callback states out (``LightningModule.on_load_checkpoint`` runs before any
    callback hook; a technique's own ``on_load_checkpoint`` runs before any ``load_state_dict``).
    """
    states = checkpoint.get("callbacks")
    if not isinstance(states, MutableMapping):
        return
    for technique in techniques:
        old, new = technique.legacy_state_key, technique.state_key
        if old is not None and old != new and old in states and new not in states:
            states[new] = states.pop(old)


def check_checkpoint_techniques(checkpoint: Mapping[str, Any], techniques: Sequence[Recorded]) -> None:
    """Refuse a checkpoint that holds the state of a technique none of ``techniques`` takes back.

    Called on resume by the first technique of the trainer and, when there is none, by
    :class:`~lit_partial.PartialBackpropMixin`. A technique of the same class with ``accept_config_change=True``
    accepts the loss of the old state.

    Raises:
        CheckpointMismatchError: Naming the orphaned state, its configuration and the fix.
    """
    states = checkpoint.get("callbacks") or {}
    claimed = {t.state_key for t in techniques} | {t.legacy_state_key for t in techniques}
    for key, state in states.items():
        record = state.get(MARK) if isinstance(state, Mapping) else None
        if not isinstance(record, Mapping) or key in claimed:
            continue
        kind = str(record.get("technique", "a technique"))
        same = [t for t in techniques if t.technique_record()["technique"] == kind]
        if any(t.accept_config_change for t in same):
            rank_zero_warn(f"lit_partial: the checkpoint's state of {key} is not resumed (accept_config_change=True).")
            continue
        if len(same) == 1:
            changes = differences(record.get("config"), jsonable(same[0].config()))
            now = f" This run has {kind} with a different configuration ({changes})."
        else:
            now = f" This run has {', '.join(t.state_key for t in same)} instead." if same else ""
        raise CheckpointMismatchError(
            f"the checkpoint holds the state of a {kind} (configuration {json.dumps(record.get('config'))}), which "
            f"this run does not have.{now} Fix: resume with the callbacks the checkpoint was made with; to change them "
            f"on purpose, pass accept_config_change=True to the new {kind}, or start a new run from the weights alone "
            "(load them, and do not pass ckpt_path)."
        )
