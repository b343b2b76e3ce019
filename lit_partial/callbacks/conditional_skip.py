"""``ConditionalSkip`` and ``StochasticDepth``: residual-style modules return their input while a condition holds."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import lightning as L
from torch import Tensor, nn
from typing_extensions import override

from lit_partial._plain import to_plain
from lit_partial.callbacks._output_layout import (
    SAME_AS_INPUT,
    OutputLayout,
    call_key,
    describe,
    hidden_input,
    learn_layout,
    mix_rows,
    returns_tensor,
    skipped_output,
)
from lit_partial.callbacks._rules import DynamicGraphCallback, Rule, may_hold, parse_rules, resolve_targets
from lit_partial.conditions import Probability
from lit_partial.errors import ConfigurationError, IncompatibleModuleError
from lit_partial.handles import wrap_forward
from lit_partial.selection import Selectors, as_selector_list, canonical_name, select_modules

__all__ = ["DROP_DISTRIBUTIONS", "ConditionalSkip", "StochasticDepth", "stochastic_depth_rates"]


class ConditionalSkip(DynamicGraphCallback):
    """Make selected modules return their input unchanged while a condition holds (training steps only).

    Meant for residual-style modules (``x -> x + f(x)``): ResNet blocks, transformer layers (LayerDrop over
    ``bert.encoder.layer.*``, ``model.layers.*``, ``transformer.h.*``). A skipped call runs no part of the module:
    no forward, no backward, no BatchNorm statistics update, no random draw. Keys are module selectors; values
    are conditions (see :mod:`lit_partial.conditions`; statistics look at the module's input), or
    ``{"when": condition, "per_sample": true}`` to skip single batch rows (the module still runs, skipped rows
    take the input). Validation, test and predict always run every module. Under DDP, a rule that can skip a
    whole module makes the strategy run with ``find_unused_parameters=True`` (logged). Logs
    ``conditional_skip/<key>``: the fraction of steps (or samples) skipped per epoch.

    What a skipped call returns. Modules may be called with any positional and keyword arguments. The
    *input* is the first positional argument (or ``hidden_states=`` when there is none); a skipped call returns
    it in the structure of the module's output:

    * an output with the input's structure and shapes (a residual block; a transformers >= 5 layer, which
      returns a tensor): the input itself;
    * any other structure (a tuple ``(hidden_states, attn_weights, present)``, a named tuple, a dict, a
      ``ModelOutput``): that structure, with the input where the output's first tensor of the input's shape
      is, every object the module returns that was passed in (a cache) as passed in this call, untouched,
      and every other tensor (attention weights, ...) ``None``.

    The structure is learned from calls that run (validation, Lightning's sanity check, training steps on
    which the module is not skipped), once per kind of call: the module's class, argument types and flag
    values. Layers of one class called alike share it, so ``model.layers.7`` skipped at its first call returns
    what ``model.layers.0`` did. A module skipped before any call like it has run returns its input as it is
    if its ``forward`` is annotated ``-> Tensor`` or it is called with its input alone (a residual block);
    otherwise that first call is an error naming the module and the fix (let one call run first). Either
    assumption is checked at the first call that runs: another structure stops training with an error naming
    the module and what it returned. Outputs matching neither form (no tensor of the input's shape) are an
    error at their first call, naming the module and what it returned. With ``output_attentions=True`` a
    Hugging Face model collects attention weights from the layers that ran only.

    Args:
        rules: ``{selector: condition | {"when": condition, "per_sample": bool}}``.
        log: Log the per-rule fractions with ``pl_module.log``.
        accept_config_change: Resume from a checkpoint made with other rules (see
            :class:`~lit_partial.callbacks.base.Technique`); by default that is an error naming what changed.

    Raises:
        ValueError: If ``rules`` is empty or not a dict, or a rule has unknown keys.
        ConditionError: If a condition is invalid (the message lists the valid forms).
        SelectorError: At ``setup``, if a selector matches no module.
        RuntimeError: At the first call of a module whose output has no tensor of its input's shape, or of a
            module skipped before any call like it ran whose structure no convention gives (see above).

    Example:
        >>> import lightning as L
        >>> from lit_partial.demos import DigitsClassifier, DigitsDataModule
        >>> skip = ConditionalSkip({"backbone.res.*": {"probability": 0.5}})  # each block skipped half the steps
        >>> trainer = L.Trainer(callbacks=[skip], max_steps=8, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(DigitsClassifier(channels=[8], residual_blocks=2), DigitsDataModule(batch_size=16))
        >>> skip.totals  # skipped, decided: 8 steps x 2 blocks, each skipped with probability 0.5
        {'backbone.res.*': [11.0, 16.0]}
    """

    log_prefix = "conditional_skip"
    verb = "skipped"

    def __init__(self, rules: dict[str, Any], log: bool = True, *, accept_config_change: bool = False) -> None:
        super().__init__(
            parse_rules(rules, who=type(self).__name__, allow_grad_scale=False),
            log=log,
            accept_config_change=accept_config_change,
        )
        self._layouts: dict[tuple[Any, ...], OutputLayout] = {}
        self._checked: set[str] = set()

    def _ddp_reason(self) -> str:
        cutting = [key for key, rule in self.rules.items() if rule.cuts_graph]
        return f"rules {cutting} skip whole modules, so their parameters get no gradient on those steps"

    def _targets(self, model: nn.Module) -> list[tuple[Rule, str, nn.Module]]:
        modules, _ = resolve_targets(model, self.rules, who=type(self).__name__, allow_gates=False)
        return [(self.rules[key], name, module) for key, hits in modules.items() for name, module in hits]

    def _attach_rules(self, model: nn.Module) -> None:
        self._layouts = {}  # call_key -> output structure: learned anew in every fit
        self._checked = set()  # selected modules whose own output was checked (shapes differ within a class)
        targets = self._targets(model)
        for rule, name, module in targets:
            self.target(rule, name)  # what _decide reads this step's decision from
            # outer: a skipped module runs nothing, not even another technique's wrapper (e.g. a checkpoint)
            self.handles.add(wrap_forward(module, self._skipping_forward(rule, name, module), outer=True))
        # Unselected modules of a selected class teach the structure too (LayerDrop on the top layers only).
        selected = {id(module) for _, _, module in targets}
        classes = {type(module) for _, _, module in targets}
        for name, module in model.named_modules():
            if type(module) in classes and id(module) not in selected:
                self.handles.add(module.register_forward_hook(self._learning_hook(name), with_kwargs=True))

    def _skipping_forward(self, rule: Rule, name: str, module: nn.Module) -> Callable[..., Any]:
        who = type(self).__name__

        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            x = hidden_input(who, name, args, kwargs)
            decision = self._decide(rule, name, x)
            if decision is True:  # runs nothing: the output is built from the structure learned or assumed
                return skipped_output(self._layout_for_skip(name, module, x, args, kwargs), x, args, kwargs)
            out = original(*args, **kwargs)
            layout = self._learn(name, module, x, args, kwargs, out)
            if isinstance(decision, Tensor) and may_hold(decision):
                return mix_rows(layout, x, out, decision, args, kwargs)
            return out

        return forward

    def _learning_hook(self, name: str) -> Callable[..., None]:
        who = type(self).__name__

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            key = call_key(module, args, kwargs)
            known = self._layouts.get(key)
            if known is not None and known.source == "learned":
                return
            try:
                layout = learn_layout(name, hidden_input(who, name, args, kwargs), args, kwargs, out, who=who)
            except IncompatibleModuleError:  # not selected, so not required to be skippable: it teaches nothing
                return
            self._check_assumption(name, module, known, layout, out)
            self._layouts[key] = layout

        return hook

    def _decide(self, rule: Rule, name: str, x: Any) -> bool | Tensor:
        """Whether to skip now: False outside training steps, a bool, or a ``(B,)`` mask for per-sample rules.

        Runs inside forward (a compiled region when the model is compiled): it reads the decision made at the
        step's start (:meth:`DynamicGraphCallback.begin_step`), or evaluates a statistic on ``x``, nothing else.
        """
        decision = self._step_targets[name].resolve(x)
        return False if decision is None else decision  # None: validation, test, predict, or outside a step

    def _learn(
        self, name: str, module: nn.Module, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> OutputLayout:
        """The layout of ``out``: checked on each module's first run, then learned once per kind of call."""
        key = call_key(module, args, kwargs)
        known = self._layouts.get(key)
        if known is not None and known.source == "learned" and name in self._checked:
            return known
        layout = learn_layout(name, x, args, kwargs, out, who=type(self).__name__)  # raises if not skippable
        self._checked.add(name)
        self._check_assumption(name, module, known, layout, out)
        self._layouts[key] = layout
        return layout

    def _check_assumption(
        self, name: str, module: nn.Module, known: OutputLayout | None, layout: OutputLayout, out: Any
    ) -> None:
        """Raise if a skip before any run assumed the input's structure and the real output has another."""
        if known is None or known.source == "learned" or layout.same_as_input:
            return
        raise IncompatibleModuleError(
            f"{type(self).__name__} skipped module {name!r} (or another {type(module).__name__} called the same "
            f"way) before any had run, assuming ({_ASSUMPTIONS[known.source]}) that it returns its input's "
            f"structure; its first call that ran returned {type(out).__qualname__} {describe(out)}. Fix: let it "
            "run once before it can be skipped: keep Lightning's validation sanity check (num_sanity_val_steps > 0 "
            "with a validation dataloader), or start the rule at step 1 ({'all': [{'steps': [1, null]}, "
            "<condition>]})."
        )

    def _layout_for_skip(
        self, name: str, module: nn.Module, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> OutputLayout:
        """The layout a skipped call uses: learned from a call of this kind that ran, else assumed, else an error."""
        key = call_key(module, args, kwargs)
        layout = self._layouts.get(key)
        if layout is None:
            layout = _assumed_layout(type(self).__name__, name, module, x, args, kwargs)
            self._layouts[key] = layout
        return layout


_ASSUMPTIONS = {
    "annotation": "its forward is annotated `-> Tensor`",
    "residual": "it is called with its input alone, like a residual block",
}


def _assumed_layout(
    who: str, name: str, module: nn.Module, x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> OutputLayout:
    """The structure of a module skipped before any call of its kind ran, from a convention; else an error."""
    if isinstance(x, Tensor) and returns_tensor(module):
        return replace(SAME_AS_INPUT, source="annotation")
    if len(args) == 1 and not kwargs:
        return replace(SAME_AS_INPUT, source="residual")
    raise IncompatibleModuleError(
        f"{who} cannot skip module {name!r} ({type(module).__name__}) at its first call: no call like it has run "
        f"yet, so the structure of its output is unknown (it is called with {len(args)} positional and "
        f"{len(kwargs)} keyword arguments, and its forward is not annotated `-> Tensor`). A skipped call runs no "
        "part of the module, not even to learn that. Fix: let it run once before it can be skipped: keep "
        "Lightning's validation sanity check (num_sanity_val_steps > 0 with a validation dataloader), or start "
        "the rule at step 1 ({'all': [{'steps': [1, null]}, <condition>]})."
    )


DROP_DISTRIBUTIONS = ("linear", "uniform")


def stochastic_depth_rates(num_blocks: int, drop_rate: float, distribution: str = "linear") -> list[float]:
    """Drop probability of each block, by ``distribution`` (composer's ``drop_distribution``).

    ``"linear"`` rises with depth, ``drop_rate * (i + 1) / num_blocks`` (Huang et al.; composer's default);
    ``"uniform"`` gives every block ``drop_rate``.

    Example:
        >>> stochastic_depth_rates(4, 0.5), stochastic_depth_rates(2, 0.5, "uniform")
        ([0.125, 0.25, 0.375, 0.5], [0.5, 0.5])
    """
    if distribution == "uniform":
        return [drop_rate] * num_blocks
    return [drop_rate * (i + 1) / num_blocks for i in range(num_blocks)]


class StochasticDepth(ConditionalSkip):
    """Stochastic depth (Huang et al., 2016): each residual block is skipped at random, deeper ones more often.

    The ``i``-th selected block (of ``L``, in model order) is skipped with probability
    ``drop_rate * (i + 1) / L`` (``drop_distribution="linear"``: the last block with ``drop_rate``) or
    ``drop_rate`` (``"uniform"``). With ``drop_warmup`` every rate ramps linearly from 0 over that fraction of
    training (composer's ``drop_warmup``): ``rate * min(1, step / n)`` with ``n = round(drop_warmup *
    trainer.estimated_stepping_batches)`` optimizer steps, fixed at ``setup``. Draws are rank-identical and resume
    exactly (``seed``, block name, step), and are made before each step, outside a compiled forward.
    Kept blocks are not rescaled (torchvision divides the residual by the survival rate in training, Huang et
    al. scale it at test time); the model sees unscaled residuals in both modes. Logs
    ``conditional_skip/<block>`` per block.

    Args:
        blocks: Selector(s) of the residual blocks, e.g. ``"blocks.*"``.
        drop_rate: Drop probability of the deepest block (of every block with ``"uniform"``), in [0, 1].
        seed: Seed of the draws.
        per_sample: Skip single batch rows instead of the whole batch (every block then runs).
        log: Log the per-block fractions.
        drop_warmup: Fraction of training, in [0, 1), over which the rates ramp up from 0 (0: no warm-up).
        drop_distribution: ``"linear"`` (rates rise with depth) or ``"uniform"`` (every block ``drop_rate``).
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`).

    Raises:
        ValueError: If ``drop_rate`` is outside [0, 1], ``seed`` is not a non-negative integer, ``drop_warmup``
            is outside [0, 1) or ``drop_distribution`` is unknown; at ``setup``, a ``drop_warmup`` for a run
            without a known length.

    Example:
        >>> from lit_partial.demos import DigitsClassifier, DigitsDataModule
        >>> depth = StochasticDepth(blocks="backbone.res.*", drop_rate=0.5, drop_warmup=0.5)
        >>> trainer = L.Trainer(callbacks=[depth], max_steps=8, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(DigitsClassifier(channels=[8], residual_blocks=2), DigitsDataModule(batch_size=16))
        >>> [rule.condition for rule in depth.rules.values()]  # ramped up over the first 4 of the 8 steps
        [Probability(p=0.25, seed=0, warmup_steps=4), Probability(p=0.5, seed=0, warmup_steps=4)]
    """

    def __init__(
        self,
        blocks: Selectors = "blocks.*",
        drop_rate: float = 0.1,
        seed: int = 0,
        per_sample: bool = False,
        log: bool = True,
        drop_warmup: float = 0.0,
        drop_distribution: str = "linear",
        *,
        accept_config_change: bool = False,
    ) -> None:
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, int | float) or not 0.0 <= drop_rate <= 1.0:
            raise ConfigurationError(f"`drop_rate` must be a number in [0, 1], got {drop_rate!r}; 0.1-0.5 are usual.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"`seed` must be a non-negative integer, got {seed!r}.")
        if isinstance(drop_warmup, bool) or not isinstance(drop_warmup, int | float) or not 0.0 <= drop_warmup < 1.0:
            raise ConfigurationError(
                f"`drop_warmup` must be a fraction of training in [0, 1), got {drop_warmup!r}; e.g. 0.1 ramps the "
                "drop rates up from 0 over the first tenth of training."
            )
        if drop_distribution not in DROP_DISTRIBUTIONS:
            raise ConfigurationError(
                f"`drop_distribution` must be one of {list(DROP_DISTRIBUTIONS)}, got {drop_distribution!r}: 'linear' "
                "rises with depth to drop_rate, 'uniform' gives every block drop_rate."
            )
        self.drop_warmup, self.drop_distribution = float(drop_warmup), drop_distribution
        self.warmup_steps = 0  # drop_warmup in optimizer steps, set in setup
        self.blocks = as_selector_list(to_plain(blocks), argument="blocks")
        self.drop_rate, self.seed = float(drop_rate), seed
        when = {"probability": self.drop_rate, "seed": seed}
        # Placeholder rules validate the arguments now; setup replaces them by one rule per block.
        rules = {key: {"when": when, "per_sample": per_sample} for key in self.blocks}
        super().__init__(rules, log=log, accept_config_change=accept_config_change)
        self.per_sample = per_sample

    @override
    def config(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "drop_rate": self.drop_rate,
            "seed": self.seed,
            "per_sample": self.per_sample,
            "drop_warmup": self.drop_warmup,
            "drop_distribution": self.drop_distribution,
        }

    @override
    def legacy_config(self) -> dict[str, Any] | None:
        # Checkpoints written before configurations were plain data recorded the two later options only where set.
        config = self.config()
        if not self.drop_warmup:
            del config["drop_warmup"]
        if self.drop_distribution == "linear":
            del config["drop_distribution"]
        return config

    @override
    def attach(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.warmup_steps = 0
        if self.drop_warmup:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ConfigurationError(
                    f"StochasticDepth(drop_warmup={self.drop_warmup}) is a fraction of training, and this run has no "
                    f"known length (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}). Fix: set "
                    "max_steps or max_epochs, or ramp over a number of steps with ConditionalSkip({blocks: "
                    "{'probability': p, 'warmup_steps': n}})."
                )
            self.warmup_steps = max(1, round(self.drop_warmup * total))
        super().attach(trainer, pl_module)

    def _targets(self, model: nn.Module) -> list[tuple[Rule, str, nn.Module]]:
        found = select_modules(model, self.blocks)
        rates = stochastic_depth_rates(len(found), self.drop_rate, self.drop_distribution)
        keys = [canonical_name(name) for name, _ in found]  # the same whether or not a submodule is compiled
        self.rules = {
            key: Rule(key, Probability(min(1.0, rate), self.seed, self.warmup_steps), per_sample=self.per_sample)
            for key, rate in zip(keys, rates, strict=True)
        }
        self.totals = {key: self.totals.get(key, [0.0, 0.0]) for key in self.rules}
        self.epoch_counts = {key: self.epoch_counts.get(key, [0.0, 0.0]) for key in self.rules}
        return [(self.rules[key], name, module) for key, (name, module) in zip(keys, found, strict=True)]

    def _ddp_reason(self) -> str:
        return "blocks are skipped at random, so their parameters get no gradient on those steps"

    def expected_executed_fraction(self) -> float:
        """The expected fraction of block executions per training step after the warm-up (1 - mean drop rate)."""
        rates = [rule.condition.p for rule in self.rules.values()]  # type: ignore[attr-defined]  # Probability rules
        return 1.0 - math.fsum(rates) / len(rates) if rates else 1.0
