"""``ActivationDetach``: cut, recompute or offload activations of selected modules during training steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_partial import _compat
from lit_partial._plain import to_plain
from lit_partial.callbacks._conditional import ConditionalTechnique
from lit_partial.callbacks._decisions import RuleTarget
from lit_partial.callbacks._rule_spec import Rule, apply_decision, parse_rules
from lit_partial.conditions import StepContext
from lit_partial.errors import ConfigurationError
from lit_partial.functional.activation_cuts import checkpoint_modules, offload_modules
from lit_partial.functional.selective_checkpoint import Policy, resolve_policy
from lit_partial.handles import Handle
from lit_partial.selectors import Selectors, as_selector_list, preview, select_modules

__all__ = ["ActivationDetach"]


def _describe_policy(policy: Policy) -> Any:
    """A policy as plain data for the saved configuration: the preset, the op names, or the function's name."""
    if isinstance(policy, str):
        return policy
    if callable(policy) and not isinstance(policy, (list, tuple)):
        return f"function:{getattr(policy, '__qualname__', type(policy).__name__)}"
    return [str(op) for op in resolve_policy(policy)]  # type: ignore[union-attr]  # a list here


class ActivationDetach(ConditionalTechnique):
    """Spend less activation memory in training steps: detach, checkpoint or offload selected modules.

    * ``at``: the outputs of these modules are detached, so nothing before them keeps activations for
      backward - exactly what ``h = module(x).detach()`` written in ``forward`` does (the modules and all
      before them get no gradient). A dict ``{selector: condition}`` detaches only while the condition holds
      (the rule forms of :class:`~lit_partial.ConditionalDetach`, which evaluates them the same way, with
      per-rule counters and logging on top; statistic conditions look at the module's output).
    * ``checkpoint``: these modules keep only their inputs and are recomputed in backward
      (``torch.utils.checkpoint``, non-reentrant, RNG state preserved): gradients are identical to the plain
      run. BatchNorm inside them updates its running statistics once per step (the recomputation's update
      is undone). A module that modifies its input in place raises ``UnsafeCheckpointError`` naming it.
    * ``offload``: the tensors these modules save for backward live in pinned host memory until backward
      (``save_on_cpu``). GPU only: on CPU it warns and does nothing.
    * ``memory_budget``: ``torch.compile``'s activation memory budget for the training graphs compiled during
      ``fit`` (``torch._functorch.config.activation_memory_budget``, which the min-cut partitioner reads): 1.0
      saves every activation it does not find cheaper to recompute (torch's default), 0.0 recomputes as much as
      possible (matmuls included), values between trade memory for recomputation. Gradients are those of the
      uncompiled model. It only acts on a compiled model, so ``setup`` refuses an uncompiled one. It is set at
      ``setup`` (before the first compiled forward; validation graphs are not partitioned, so unaffected) and
      the previous value is restored at ``teardown``; it applies to everything compiled in between in this
      process, and not to graphs compiled before ``fit``. Alone or beside the other three.

    Everything acts only inside training steps: validation, test, predict and direct calls outside the
    trainer run the model untouched. All hooks and wrapped ``forward`` s are removed at ``teardown``. Under
    DDP, ``at`` makes the strategy use ``find_unused_parameters=True`` (the cut-off parameters get no
    gradient). Conditions are decided at the start of each training step, outside the model's forward (so a
    compiled model recompiles only per distinct decision); the only state to save is the history of the metrics
    that metric conditions read.

    Args:
        at: Module selectors whose outputs are detached, or ``{selector: condition}``.
        checkpoint: Module selectors to recompute in backward (nested selections use the outermost).
        offload: Module selectors whose saved tensors go to host memory (GPU only).
        segments: With ``checkpoint`` naming an ``nn.Sequential``: checkpoint it as this many consecutive
            pieces, or ``"sqrt"`` for round(sqrt(len)); ``None`` checkpoints each selected module whole.
        policy: Selective checkpointing of the ``checkpoint`` modules: the ops whose outputs are saved, the rest
            recomputed - ``"matmul"`` (matrix products and fused attention), a list of op names
            (``["aten.mm", "aten.addmm"]``) or a policy function (see
            :mod:`lit_partial.functional.selective_checkpoint`); ``None``: save only the inputs. Checkpointed modules
            whose parameters and inputs need no gradient (frozen, below everything that trains) run plainly.
        memory_budget: ``torch.compile``'s activation memory budget in [0, 1] for the training graphs (needs a
            compiled model: ``model.compile()``, ``torch.compile(model)`` or a compiled submodule); ``None``:
            torch's setting is left alone.
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`).

    Raises:
        ValueError: If no technique is given, ``segments`` is not a positive int, ``"sqrt"`` or None, or
            ``memory_budget`` is not a number in [0, 1].
        ConfigurationError: At ``setup``, if ``memory_budget`` is set and the model is not compiled.
        ConditionError: If a condition in ``at`` is invalid.
        SelectorError: If a selector is malformed (``__init__``) or matches no module (``setup``).

    Example:
        >>> from lit_partial.demos import DigitsClassifier, DigitsDataModule
        >>> cb = ActivationDetach(at="backbone.0", checkpoint=["backbone.1", "backbone.2"])
        >>> model = DigitsClassifier()
        >>> trainer = L.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        >>> trainer.fit(model, DigitsDataModule())
        >>> model.backbone[0][0].weight.grad is None  # below the cut: no gradient
        True
    """

    def __init__(
        self,
        at: Selectors | Mapping[str, Any] | None = None,
        checkpoint: Selectors | None = None,
        offload: Selectors | None = None,
        segments: int | str | None = None,
        *,
        policy: Policy | None = None,
        memory_budget: float | None = None,
        accept_config_change: bool = False,
    ) -> None:
        at, checkpoint, offload = to_plain(at), to_plain(checkpoint), to_plain(offload)
        if at is None and checkpoint is None and offload is None and memory_budget is None:
            raise ConfigurationError(
                "ActivationDetach needs at least one of `at`, `checkpoint`, `offload`, `memory_budget`, e.g. "
                "ActivationDetach(at='backbone.0') or ActivationDetach(checkpoint='blocks.*')."
            )
        if memory_budget is not None and (type(memory_budget) is bool or not isinstance(memory_budget, int | float)):
            raise ConfigurationError(
                f"`memory_budget` must be a number in [0, 1] or None, got {memory_budget!r}; e.g. memory_budget=0.5."
            )
        if memory_budget is not None and not (0.0 <= memory_budget <= 1.0):  # NaN fails this too
            raise ConfigurationError(
                f"`memory_budget` must be in [0, 1], got {memory_budget!r}: 1.0 saves every activation (torch's "
                "default), 0.0 recomputes as much as possible; e.g. memory_budget=0.5."
            )
        if segments is not None and segments != "sqrt" and (type(segments) is not int or segments < 1):
            raise ConfigurationError(f"`segments` must be a positive int, 'sqrt' or None, got {segments!r}.")
        if segments is not None and checkpoint is None:
            raise ConfigurationError(
                f"`segments={segments!r}` applies to `checkpoint`, which is not set; set both or neither."
            )
        if policy is not None and checkpoint is None:
            raise ConfigurationError(
                f"`policy={policy!r}` chooses what `checkpoint` saves, which is not set; e.g. "
                "ActivationDetach(checkpoint='model.layers.*', policy='matmul')."
            )
        if policy is not None:
            resolve_policy(policy)  # fails here, naming the bad entry, rather than at the first step
        if isinstance(at, Mapping) and not at:
            raise ConfigurationError("`at` is an empty dict; name at least one module, e.g. {'backbone.0': 'always'}.")
        if at is not None and not isinstance(at, Mapping):
            at = dict.fromkeys(as_selector_list(at, argument="at"), "always")
        self.at: dict[str, Rule] = parse_rules(at, who="ActivationDetach", allow_grad_scale=False) if at else {}
        # The conditional base's step loop decides the `at` rules; counting switched off (counts_decisions).
        super().__init__(self.at, log=False, accept_config_change=accept_config_change)
        self.checkpoint = as_selector_list(checkpoint, argument="checkpoint") if checkpoint is not None else []
        self.offload = as_selector_list(offload, argument="offload") if offload is not None else []
        self.segments = segments
        self.policy = policy
        self.memory_budget = None if memory_budget is None else float(memory_budget)
        self._active = False  # True only inside training steps (a bool: a compiled forward guards it by value)
        self._detached: dict[str, Rule] = {}  # module name -> its rule, set in setup

    @override
    def config(self) -> dict[str, Any]:
        return {
            "at": {key: rule.to_spec(grad_scale=False) for key, rule in self.at.items()},
            "checkpoint": self.checkpoint,
            "offload": self.offload,
            "segments": self.segments,
            **({"policy": _describe_policy(self.policy)} if self.policy is not None else {}),
            **({"memory_budget": self.memory_budget} if self.memory_budget is not None else {}),
        }

    @override
    def legacy_config(self) -> dict[str, Any] | None:
        # Checkpoints written before configurations were plain data recorded each rule as repr(Rule(...)).
        return {**self.config(), "at": {key: repr(rule) for key, rule in self.at.items()}}

    def _is_active(self) -> bool:
        return self._active

    counts_decisions = False

    def _attach_rules(self, model: nn.Module) -> None:
        self._detached = {}
        for selector, rule in self.at.items():  # each selector's rule applies to the modules it selects
            for name, _ in select_modules(model, selector):
                self._detached.setdefault(name, rule)
        for name, rule in self._detached.items():
            target = self.target(rule, name)  # draws salted by the canonical name, alike with a compiled submodule
            self.handles.add(model.get_submodule(name).register_forward_hook(self._detach_hook(target)))

    def _cuts_graph(self) -> bool:
        return bool(self.at)

    def _ddp_reason(self) -> str:
        return f"outputs of {preview(sorted(self._detached))} are detached"

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.memory_budget is not None:
            self._set_memory_budget(pl_module, self.memory_budget)
        super().attach(trainer, pl_module)  # the `at` rules: forward hooks, DDP's unused parameters
        detached = self._detached
        checkpointed = [name for name, _ in select_modules(pl_module, self.checkpoint)] if self.checkpoint else []
        offloaded = [name for name, _ in select_modules(pl_module, self.offload)] if self.offload else []
        if checkpointed:
            self.handles.add(
                checkpoint_modules(
                    pl_module, checkpointed, segments=self.segments, enabled=self._is_active, policy=self.policy
                )
            )
        if offloaded:
            if trainer.strategy.root_device.type != "cuda":
                rank_zero_warn(
                    f"ActivationDetach: `offload={self.offload}` keeps saved tensors in host memory, which only saves "
                    f"memory on a GPU; training runs on {trainer.strategy.root_device.type}, so offload does nothing."
                )
                offloaded = []
            else:
                self.handles.add(offload_modules(pl_module, offloaded, enabled=self._is_active))
        parts = {"detach after": sorted(detached), "checkpoint": checkpointed, "offload": offloaded}
        self._summary = ", ".join(f"{what} {preview(names)}" for what, names in parts.items())
        if self.memory_budget is not None:
            self._summary += f", compiler memory budget {self.memory_budget:g}"
        rank_zero_info(f"ActivationDetach: {self._summary}")

    def _set_memory_budget(self, pl_module: L.LightningModule, budget: float) -> None:
        if not (compiled := _compat.compiled_parts(pl_module)):
            raise ConfigurationError(
                f"ActivationDetach(memory_budget={budget:g}) sets torch.compile's activation memory budget, which acts "
                f"only on compiled graphs, and {type(pl_module).__name__} is not compiled (nor any of its submodules). "
                "Compile it before fit: `model.compile()`, `trainer.fit(torch.compile(model), ...)` or "
                "`model.blocks = torch.compile(model.blocks)`; or drop `memory_budget`."
            )
        previous = _compat.set_activation_memory_budget(budget)

        def restore() -> None:
            _compat.set_activation_memory_budget(previous)

        self.handles.add(Handle(restore))
        rank_zero_info(
            f"ActivationDetach: torch.compile activation memory budget {budget:g} (was {previous:g}) for "
            f"{preview([name or '<model>' for name in compiled])}"
        )

    @staticmethod
    def _detach_hook(target: RuleTarget) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            decision = target.resolve(output)  # decided at the step's start; None outside training steps
            return None if decision is None else apply_decision(target.rule, decision, output)

        return hook

    @override
    def run_summary(self) -> list[str]:
        summary = getattr(self, "_summary", "")
        return [f"ActivationDetach: {summary}"] if summary else []

    @override
    def begin_step(self, ctx: StepContext, batch: Any = None) -> None:
        super().begin_step(ctx, batch)
        self._active = True

    @override
    def end_step(self) -> None:
        self._active = False
        super().end_step()
