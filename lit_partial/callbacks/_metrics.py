"""What metric conditions read: the values of logged metrics at each evaluation, the same on every rank.

A :class:`MetricRecorder` belongs to a callback whose conditions read metrics (``{"metric": ...}``,
``{"plateau": ...}``). It records each metric once per evaluation, at the point Lightning's ``EarlyStopping``
checks its monitor: at the end of every training epoch when validation runs once per epoch (or not at all),
otherwise after each validation run (never during the sanity check). The values are rank 0's, broadcast to
every rank, so every rank takes the same decision (log with ``sync_dist=True`` to make them the mean over
ranks). The history is saved with the callback's state, so a resumed run decides exactly as an uninterrupted
one. A metric that was not logged by the first evaluation is an error naming the metrics that were.

Example:
    >>> recorder = MetricRecorder(["val_loss"], who="LayerFreezing")
    >>> recorder.record({"val_loss": 0.5, "val_acc": 0.9})
    >>> recorder.record({"val_loss": 0.4})
    >>> recorder.history
    {'val_loss': [0.5, 0.4]}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning as L

from lit_partial.errors import ConfigurationError

__all__ = ["MetricRecorder"]


class MetricRecorder:
    """The history of the metrics ``names`` over the evaluations of a run (see the module docstring).

    Args:
        names: The metrics to record.
        who: The owning callback's name, for error messages.
    """

    def __init__(self, names: Iterable[str], *, who: str) -> None:
        self.names = sorted(set(names))
        self.who = who
        self.history: dict[str, list[float]] = {name: [] for name in self.names}
        self._at_epoch_end = True

    def __bool__(self) -> bool:
        return bool(self.names)

    @property
    def count(self) -> int:
        """How many evaluations have been recorded."""
        return len(self.history[self.names[0]]) if self.names else 0

    def view(self) -> Mapping[str, Sequence[float]] | None:
        """The history as :attr:`lit_partial.conditions.StepContext.metrics` expects it (None when empty)."""
        return {name: tuple(values) for name, values in self.history.items()} if self.names else None

    def setup(self, trainer: L.Trainer) -> None:
        """Choose the evaluation point like ``EarlyStopping``: epoch end when validation runs once per epoch."""
        self._at_epoch_end = trainer.val_check_interval == 1.0 and trainer.check_val_every_n_epoch == 1

    def on_validation_end(self, trainer: L.Trainer) -> None:
        """Record after a validation run (when validation runs more or less often than once per epoch)."""
        if not self._at_epoch_end and self.names and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.observe(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer) -> None:
        """Record at the end of a training epoch (when validation runs once per epoch, or never)."""
        if self._at_epoch_end and self.names:
            self.observe(trainer)

    def observe(self, trainer: L.Trainer) -> None:
        """Read the metrics from ``trainer.callback_metrics`` on rank 0 and record them on every rank.

        Raises:
            ConfigurationError: On every rank, if a metric has not been logged, naming the ones that have.
        """
        logged = trainer.callback_metrics
        payload: dict[str, Any] = {"missing": [n for n in self.names if n not in logged], "logged": sorted(logged)}
        if not payload["missing"]:
            payload["values"] = {name: float(logged[name]) for name in self.names}
        payload = trainer.strategy.broadcast(payload, src=0)
        if payload["missing"] and _stopping(trainer):
            return  # the run ends here (e.g. max_steps within the epoch, before validation): nothing will read it
        if payload["missing"]:
            raise ConfigurationError(
                f"{self.who}: a condition reads metric(s) {payload['missing']}, which were not logged by the end of "
                f"epoch {trainer.current_epoch}. Logged metrics: {payload['logged'] or 'none'}. Fix: use one of those "
                "names, or log the metric with self.log(name, value) in training_step or validation_step."
            )
        self.record(payload["values"])

    def record(self, values: Mapping[str, float]) -> None:
        """Append one evaluation's values (only the recorded names are kept)."""
        for name in self.names:
            self.history[name].append(float(values[name]))

    def state(self) -> dict[str, list[float]]:
        """The history, for the callback's checkpoint state."""
        return {name: list(values) for name, values in self.history.items()}

    def load(self, state: Mapping[str, Sequence[float]] | None) -> None:
        """Restore what :meth:`state` returned (checkpoints without it leave the history empty)."""
        for name in self.names:
            self.history[name] = [float(v) for v in (state or {}).get(name, [])]


def _stopping(trainer: L.Trainer) -> bool:
    return bool(trainer.should_stop) or 0 <= trainer.max_steps <= trainer.global_step
