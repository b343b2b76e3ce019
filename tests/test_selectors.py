from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_partial.selectors import (
    SelectorError,
    as_selector_list,
    match_names,
    outermost,
    select_modules,
    select_parameters,
)


def make_model() -> nn.Module:
    model = nn.Module()
    model.backbone = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU()), nn.Linear(3, 3), nn.Linear(3, 3))
    model.head = nn.Linear(3, 1)
    return model


def names(pairs: list) -> list[str]:
    return [name for name, _ in pairs]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("backbone.1", ["backbone.1"]),  # exact
        ("backbone.*", ["backbone.0", "backbone.1", "backbone.2"]),  # '*' stays within one level
        ("backbone.**", ["backbone.0", "backbone.0.0", "backbone.0.1", "backbone.1", "backbone.2"]),
        ("backbone.[0-1]", ["backbone.0", "backbone.1"]),  # character class
        ("backbone.?", ["backbone.0", "backbone.1", "backbone.2"]),
        ("re:backbone\\.[12]", ["backbone.1", "backbone.2"]),  # regex, full match
        ("re:backbone", ["backbone"]),  # full match: not a prefix search
        ("*", ["backbone", "head"]),
    ],
)
def test_select_modules_forms(selector: str, expected: list[str]) -> None:
    assert names(select_modules(make_model(), selector)) == expected


def test_select_modules_model_order_and_no_duplicates() -> None:
    got = select_modules(make_model(), ["head", "backbone.2", "re:backbone\\.[0-2]", "head"])
    assert names(got) == ["backbone.0", "backbone.1", "backbone.2", "head"]


def test_select_modules_returns_the_module_objects() -> None:
    model = make_model()
    [(_name, module)] = select_modules(model, "backbone.1")
    assert module is model.backbone[1]


def test_select_parameters_expands_modules_and_names_parameters() -> None:
    model = make_model()
    got = select_parameters(model, ["head.bias", "backbone.0"])
    assert names(got) == ["backbone.0.0.weight", "backbone.0.0.bias", "head.bias"]
    assert got[2][1] is model.head.bias


def test_select_parameters_by_regex_over_parameter_names() -> None:
    assert names(select_parameters(make_model(), "re:.*\\.bias")) == [
        "backbone.0.0.bias",
        "backbone.1.bias",
        "backbone.2.bias",
        "head.bias",
    ]


def test_select_parameters_identity_not_value() -> None:
    # Equal-valued parameters are different parameters (Lightning's filter_on_optimizer drops them).
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert len(select_parameters(model, ["0", "1"])) == 4


def test_select_parameters_shared_parameter_once() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight = model[0].weight
    got = select_parameters(model, ["0", "1"])
    assert names(got) == ["0.weight", "0.bias", "1.bias"]


def test_no_match_names_closest_modules() -> None:
    with pytest.raises(
        SelectorError, match=r"selector 'backbone\.3' matched no module.*did you mean 'backbone\.[0-2]'"
    ):
        select_modules(make_model(), "backbone.3")


def test_no_match_typo_suggests_correct_name() -> None:
    with pytest.raises(SelectorError, match=r"'bakcbone'.*did you mean 'backbone'"):
        select_modules(make_model(), "bakcbone")


def test_no_match_parameter_suggests_parameters() -> None:
    with pytest.raises(SelectorError, match=r"'head\.weights' matched no parameter.*'head\.weight'"):
        select_parameters(make_model(), "head.weights")


def test_no_match_unrelated_lists_top_level_names() -> None:
    with pytest.raises(SelectorError, match=r"did you mean 'backbone', 'head'"):
        select_modules(make_model(), "zzz")


def test_second_selector_without_match_fails_too() -> None:
    with pytest.raises(SelectorError, match="'nope'"):
        select_modules(make_model(), ["head", "nope"])


def test_invalid_regex() -> None:
    with pytest.raises(SelectorError, match=r"not a valid regular expression"):
        as_selector_list("re:([")


@pytest.mark.parametrize("bad", [3, None, {"a": 1}])
def test_selector_wrong_type(bad: object) -> None:
    with pytest.raises(SelectorError, match=r"must be a string or a list of strings"):
        as_selector_list(bad, argument="frozen")  # type: ignore[arg-type]


def test_selector_empty_list_and_empty_string() -> None:
    with pytest.raises(SelectorError, match=r"`frozen` is an empty list"):
        as_selector_list([], argument="frozen")
    with pytest.raises(SelectorError, match=r"every selector must be"):
        as_selector_list(["head", " "])


def test_as_selector_list_accepts_omegaconf_lists() -> None:
    from omegaconf import OmegaConf

    assert as_selector_list(OmegaConf.create(["a", "b.*"])) == ["a", "b.*"]


def test_match_names_and_outermost() -> None:
    assert match_names(["a", "a.0", "a.0.x", "b"], "a.*") == ["a.0"]
    assert outermost(["a.0", "a", "a.0.x", "ab", "b.1"]) == ["a", "ab", "b.1"]


def wide_model(blocks: int) -> nn.Module:
    model = nn.Module()
    model.blocks = nn.ModuleList(nn.Sequential(nn.Linear(1, 1), nn.Linear(1, 1)) for _ in range(blocks))
    return model


def test_selection_does_linearly_many_match_operations() -> None:
    from lit_partial.selectors import count_match_operations

    counts = []
    for blocks in (100, 200, 400):
        model = wide_model(blocks)
        with count_match_operations() as box:
            chosen = select_parameters(model, ["blocks.*.0", "re:blocks\\.1\\..*bias"])
        counts.append(box[0])
        assert len(chosen) == 2 * blocks + 1  # every block's first Linear, and block 1's second bias
    # one match per (selector, parameter or module name): the work is a * size + b, exactly
    assert 2 * (counts[1] - counts[0]) == counts[2] - counts[1] and counts[0] == 2 * (
        4 * 100 + 3 * 100 + 1
    )  # 2 selectors x (400 parameter + 301 module names)


def test_many_module_names_walk_the_parameters_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of k module names (the bottom half of a deep model) costs one walk over the parameters, not k."""
    import lit_partial.selectors as selection

    walks = []
    ancestors = selection._ancestors
    monkeypatch.setattr(selection, "_ancestors", lambda name: walks.append(name) or ancestors(name))
    for blocks in (100, 400):
        walks.clear()
        chosen = select_parameters(wide_model(blocks), [f"blocks.{i}" for i in range(blocks // 2)])
        assert len(chosen) == 2 * blocks  # two Linears (weight and bias each) in each of blocks // 2 blocks
        assert len(walks) == 4 * blocks  # one ancestor walk per parameter


def test_tied_parameters_are_selected_by_either_name() -> None:
    model = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 5, bias=False))
    model[1].weight = model[0].weight
    assert names(select_parameters(model, "1.weight")) == ["0.weight"]


def test_selectors_see_through_compiled_submodules_both_ways() -> None:
    model = nn.Module()
    model.backbone = torch.compile(nn.Sequential(nn.Linear(1, 1)), backend="eager")
    assert names(select_parameters(model, "backbone.0")) == ["backbone._orig_mod.0.weight", "backbone._orig_mod.0.bias"]
    assert names(select_modules(model, "backbone._orig_mod.0")) == ["backbone._orig_mod.0"]


def test_gc_paused_restores_the_collector_after_errors_and_nesting() -> None:
    import gc

    from lit_partial.errors import SelectorError
    from lit_partial.selectors import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block does not turn it back on early
    assert gc.isenabled()
    with pytest.raises(SelectorError):
        select_parameters(nn.Linear(2, 2), "nope")
    assert gc.isenabled()  # select_parameters pauses it too, and restores it on errors


# ------------------------------------------------------------------------------------------------ class selectors
class Scaled(nn.Linear):
    """A subclass of Linear with a name of its own."""


def class_model() -> nn.Module:
    model = nn.Module()
    model.stem = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.ReLU())
    model.blocks = nn.ModuleList(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)) for _ in range(2))
    model.proj = Scaled(2, 2)
    model.sync = nn.SyncBatchNorm(2)
    model.head = nn.Linear(2, 1)
    return model


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("class:Linear", ["blocks.0.0", "blocks.1.0", "head"]),  # a class name: that class only, not Scaled
        ("class:Scaled", ["proj"]),
        ("class:torch.nn.Linear", ["blocks.0.0", "blocks.1.0", "proj", "head"]),  # a path: isinstance
        ("class:torch.nn.modules.linear.Linear", ["blocks.0.0", "blocks.1.0", "proj", "head"]),  # where it lives
        ("class:torch.nn.BatchNorm2d", ["stem.1"]),
        ("class:torch.nn.modules.batchnorm._BatchNorm", ["stem.1", "blocks.0.1", "blocks.1.1", "sync"]),
        ("class:Sequential", ["stem", "blocks.0", "blocks.1"]),
        ("class:ModuleList", ["blocks"]),
        (["class:BatchNorm1d", "head", "stem.*"], ["stem.0", "stem.1", "stem.2", "blocks.0.1", "blocks.1.1", "head"]),
        (["class:ReLU", "stem"], ["stem", "stem.2"]),
    ],
)
def test_class_selectors_select_modules_by_name_exactly_and_by_path_with_subclasses(
    selector: str | list[str], expected: list[str]
) -> None:
    assert names(select_modules(class_model(), selector)) == expected


def test_class_selectors_select_the_parameters_of_their_modules_and_combine_with_parameter_names() -> None:
    got = select_parameters(class_model(), ["class:BatchNorm1d", "proj.bias", "class:Conv2d"])
    assert names(got) == [
        "stem.0.weight",
        "stem.0.bias",
        "blocks.0.1.weight",
        "blocks.0.1.bias",
        "blocks.1.1.weight",
        "blocks.1.1.bias",
        "proj.bias",
    ]


def test_class_selectors_see_modules_under_a_compiled_submodule() -> None:
    model = class_model()
    model.blocks = torch.compile(model.blocks, backend="eager")
    assert names(select_modules(model, "class:BatchNorm1d")) == ["blocks._orig_mod.0.1", "blocks._orig_mod.1.1"]


@pytest.mark.parametrize(
    ("selector", "match"),
    [
        ("class:Linaer", r"'class:Linaer' matched no module of Module; did you mean 'class:Linear'"),
        ("class:BatchNorm3d", r"did you mean 'class:BatchNorm2d', 'class:BatchNorm1d', 'class:SyncBatchNorm'\?"),
        ("class:torch.nn.Conv3d", r"Module; did you mean 'class:torch.nn.modules.conv.Conv2d'\?"),  # not in the model
        ("class:Embedding", r"matched no module of Module; its classes are \['class:BatchNorm1d', "),  # nothing close
        ("class:torch.nn.Scaled", r"did you mean 'class:tests.test_selectors.Scaled'"),  # the same last name
        ("class:not_imported_pkg.Layer", r"no imported module defines 'not_imported_pkg.Layer'"),
        ("class:torch.Tensor", r"names <class 'torch.Tensor'>, which is not a torch.nn.Module class"),
    ],
)
def test_unknown_classes_fail_naming_close_classes_of_the_model(selector: str, match: str) -> None:
    with pytest.raises(SelectorError, match=match):
        select_modules(class_model(), selector)


@pytest.mark.parametrize("selector", ["class:", "class:1Linear", "class:torch..nn", "class:Linear*"])
def test_malformed_class_selectors_fail_when_validated(selector: str) -> None:
    with pytest.raises(SelectorError, match="a class selector is 'class:' and a class name or dotted path"):
        as_selector_list(selector)


def test_a_class_path_is_never_imported_by_a_selector() -> None:
    import sys

    assert "antigravity" not in sys.modules
    with pytest.raises(SelectorError, match=r"no imported module defines 'antigravity\.Fly'"):
        select_modules(class_model(), "class:antigravity.Fly")
    assert "antigravity" not in sys.modules


def test_match_names_refuses_class_selectors() -> None:
    with pytest.raises(SelectorError, match="needs the modules, not their names"):
        match_names(["a"], "class:Linear")


def test_class_selectors_do_one_match_per_module_name() -> None:
    from lit_partial.selectors import count_match_operations

    for blocks in (100, 200):
        model = wide_model(blocks)
        with count_match_operations() as box:
            chosen = select_parameters(model, "class:Linear")
        assert len(chosen) == 4 * blocks
        assert box[0] == 3 * blocks + 1  # blocks, blocks.i, blocks.i.0, blocks.i.1: one test per distinct class


def test_lit_partial_selection_is_the_deprecated_name_of_selectors() -> None:
    import lit_partial.selection as former
    import lit_partial.selectors as selectors

    with pytest.warns(DeprecationWarning, match=r"lit_partial.selection is deprecated; import select_modules from "):
        assert former.select_modules is selectors.select_modules
    with pytest.raises(AttributeError):
        former.no_such_name  # noqa: B018
