"""``ConditionalSkip`` and ``StochasticDepth``: residual-style modules return their input while a condition holds."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from typing_extensions import override

from lit_partial._plain import to_plain
from lit_partial.attach import wrap_forward
from lit_partial.callbacks._rules import DynamicGraphCallback, Rule, decide, parse_rules, resolve_targets
from lit_partial.conditions import Probability
from lit_partial.errors import ConfigurationError, IncompatibleModuleError
from lit_partial.functional.gradients import skip_rows
from lit_partial.selection import Selectors, as_selector_list, select_modules
from lit_partial.tree import first_tensor, map_tensors

__all__ = ["ConditionalSkip", "StochasticDepth", "stochastic_depth_rates"]


def _shapes(x: Any) -> Any:
    return map_tensors(x, lambda t: tuple(t.shape))


class ConditionalSkip(DynamicGraphCallback):
    """Make selected modules return their input unchanged while a condition holds (training steps only).

    Meant for residual-style modules (``x -> x + f(x)``, or any module whose output has its input's shape):
    skipping one runs neither its forward nor its backward. Keys are module selectors; values are conditions
    (see :mod:`lit_partial.conditions`; statistics look at the module's input), or
    ``{"when": condition, "per_sample": true}`` to skip single batch rows (the module still runs, skipped rows
    take the input). Validation, test and predict always run every module. The first call of each module
    checks that its output has its input's structure and shapes, and raises naming the module if not.
    Under DDP, a rule that can skip a whole module makes the strategy run with ``find_unused_parameters=True``
    (logged). Logs ``conditional_skip/<key>``: the fraction of steps (or samples) skipped per epoch.

    Args:
        rules: ``{selector: condition | {"when": condition, "per_sample": bool}}``.
        log: Log the per-rule fractions with ``pl_module.log``.
        accept_config_change: Resume from a checkpoint made with other rules (see
            :class:`~lit_partial.callbacks.base.Technique`); by default that is an error naming what changed.

    Raises:
        ValueError: If ``rules`` is empty or not a dict, or a rule has unknown keys.
        ConditionError: If a condition is invalid (the message lists the valid forms).
        SelectorError: At ``setup``, if a selector matches no module.
        RuntimeError: At the first call of a module whose output shape differs from its input's.

    Example:
        >>> import torch
        >>> from lit_partial.examples import ResidualFFN
        >>> skip = ConditionalSkip({"blocks.*": {"probability": 0.2}})  # each block skipped 20% of steps
        >>> trainer = L.Trainer(callbacks=[skip], max_steps=10)  # doctest: +SKIP
    """

    log_prefix = "conditional_skip"
    verb = "skipped"

    def __init__(self, rules: dict[str, Any], log: bool = True, *, accept_config_change: bool = False) -> None:
        super().__init__(
            parse_rules(rules, who=type(self).__name__, allow_grad_scale=False),
            log=log,
            accept_config_change=accept_config_change,
        )

    def _ddp_reason(self) -> str:
        cutting = [key for key, rule in self.rules.items() if rule.cuts_graph]
        return f"rules {cutting} skip whole modules, so their parameters get no gradient on those steps"

    def _targets(self, model: nn.Module) -> list[tuple[Rule, str, nn.Module]]:
        modules, _ = resolve_targets(model, self.rules, who=type(self).__name__, allow_gates=False)
        return [(self.rules[key], name, module) for key, hits in modules.items() for name, module in hits]

    def _attach_rules(self, model: nn.Module) -> None:
        for rule, name, module in self._targets(model):
            # outer: a skipped module runs nothing, not even another technique's wrapper (e.g. a checkpoint)
            self.handles.add(wrap_forward(module, self._skipping_forward(rule, name), outer=True))

    def _skipping_forward(self, rule: Rule, name: str) -> Callable[..., Any]:
        checked = False

        def forward(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            nonlocal checked
            if not checked:  # run it once for real, whatever the decision, to check the shapes before training
                out = original(*args, **kwargs)
                self._check_residual(name, args, kwargs, out)
                checked = True
                return self._choose(rule, name, args[0], lambda: out)
            return self._choose(rule, name, args[0], lambda: original(*args, **kwargs))

        return forward

    def _choose(self, rule: Rule, name: str, x: Any, run: Callable[[], Any]) -> Any:
        ctx = self._ctx
        if ctx is None:  # validation, test, predict or a call outside a training step
            return run()
        decision = decide(rule, ctx, first_tensor(x), salt=name)
        self._count(rule.key, decision)
        if isinstance(decision, Tensor):
            return skip_rows(x, run(), decision) if bool(decision.any()) else run()
        return x if decision else run()

    def _check_residual(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        who = type(self).__name__
        if len(args) != 1 or kwargs:
            raise IncompatibleModuleError(
                f"{who} cannot skip module {name!r}: it is called with {len(args)} positional and {len(kwargs)} "
                "keyword arguments, and a skipped module returns its single input. Fix: select a one-input module."
            )
        if _shapes(args[0]) != _shapes(out):
            raise IncompatibleModuleError(
                f"{who} cannot skip module {name!r}: its output {_shapes(out)} differs from its input "
                f"{_shapes(args[0])}, so returning the input would break the next layer. Fix: select residual-style "
                "modules whose output has the shape of their input (e.g. 'blocks.*', not a downsampling stage)."
            )


def stochastic_depth_rates(num_blocks: int, drop_rate: float) -> list[float]:
    """Drop probability of each block, rising linearly with depth: ``drop_rate * (i + 1) / num_blocks``.

    Example:
        >>> stochastic_depth_rates(4, 0.5)
        [0.125, 0.25, 0.375, 0.5]
    """
    return [drop_rate * (i + 1) / num_blocks for i in range(num_blocks)]


class StochasticDepth(ConditionalSkip):
    """Stochastic depth (Huang et al., 2016): each residual block is skipped at random, deeper ones more often.

    The ``i``-th selected block (of ``L``, in model order) is skipped with probability
    ``drop_rate * (i + 1) / L``: the last block with ``drop_rate``. Draws are rank-identical and resume
    exactly (``seed``, block name, step). Kept blocks are not rescaled (torchvision divides the residual by the
    survival rate in training, Huang et al. scale it at test time); the model sees unscaled residuals in both
    modes. Logs ``conditional_skip/<block>`` per block.

    Args:
        blocks: Selector(s) of the residual blocks, e.g. ``"blocks.*"``.
        drop_rate: Drop probability of the deepest block, in [0, 1].
        seed: Seed of the draws.
        per_sample: Skip single batch rows instead of the whole batch (every block then runs).
        log: Log the per-block fractions.
        accept_config_change: Resume from a checkpoint made with another configuration (see
            :class:`~lit_partial.callbacks.base.Technique`).

    Raises:
        ValueError: If ``drop_rate`` is outside [0, 1] or ``seed`` is not a non-negative integer.

    Example:
        >>> depth = StochasticDepth(blocks="blocks.*", drop_rate=0.5)
        >>> trainer = L.Trainer(callbacks=[depth], max_steps=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        blocks: Selectors = "blocks.*",
        drop_rate: float = 0.1,
        seed: int = 0,
        per_sample: bool = False,
        log: bool = True,
        *,
        accept_config_change: bool = False,
    ) -> None:
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, int | float) or not 0.0 <= drop_rate <= 1.0:
            raise ConfigurationError(f"`drop_rate` must be a number in [0, 1], got {drop_rate!r}; 0.1-0.5 are usual.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigurationError(f"`seed` must be a non-negative integer, got {seed!r}.")
        self.blocks = as_selector_list(to_plain(blocks), argument="blocks")
        self.drop_rate, self.seed = float(drop_rate), seed
        when = {"probability": self.drop_rate, "seed": seed}
        # Placeholder rules validate the arguments now; setup replaces them by one rule per block.
        rules = {key: {"when": when, "per_sample": per_sample} for key in self.blocks}
        super().__init__(rules, log=log, accept_config_change=accept_config_change)
        self.per_sample = per_sample

    @override
    def config(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "drop_rate": self.drop_rate, "seed": self.seed, "per_sample": self.per_sample}

    def _targets(self, model: nn.Module) -> list[tuple[Rule, str, nn.Module]]:
        found = select_modules(model, self.blocks)
        rates = stochastic_depth_rates(len(found), self.drop_rate)
        self.rules = {
            name: Rule(name, Probability(min(1.0, rate), self.seed), per_sample=self.per_sample)
            for (name, _), rate in zip(found, rates, strict=True)
        }
        self.totals = {name: self.totals.get(name, [0.0, 0.0]) for name in self.rules}
        self.epoch_counts = {name: self.epoch_counts.get(name, [0.0, 0.0]) for name in self.rules}
        return [(self.rules[name], name, module) for name, module in found]

    def _ddp_reason(self) -> str:
        return "blocks are skipped at random, so their parameters get no gradient on those steps"

    def expected_executed_fraction(self) -> float:
        """The expected fraction of block executions per training step (1 - mean drop rate)."""
        rates = [rule.condition.p for rule in self.rules.values()]  # type: ignore[attr-defined]
        return 1.0 - math.fsum(rates) / len(rates) if rates else 1.0
