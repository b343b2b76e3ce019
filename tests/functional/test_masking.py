from __future__ import annotations

import math

import pytest
import torch

from lit_partial.functional.mask_builders import (
    MASK_KINDS,
    MaskError,
    as_bool_mask,
    build_index_mask,
    build_magnitude_mask,
    build_mask,
    build_random_mask,
    build_where_mask,
    is_dynamic_spec,
    validate_mask_spec,
)
from lit_partial.functional.masking import (
    SECOND_MOMENT_FLOOR,
    count_masked,
    floor_second_moments,
    guard_masked_elements,
    mask_gradients,
    restore_masked,
    second_moment_keys,
    snapshot_masked,
)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


# --- builders ---------------------------------------------------------------------------------------------


def test_random_mask_exact_count_seeded_and_independent_of_global_rng() -> None:
    a = build_random_mask((10, 30), keep=0.1, seed=7, name="w")
    assert a.dtype == torch.bool and int(a.sum()) == 30
    torch.manual_seed(123)  # global RNG must not matter: every rank and run draws the same mask
    assert torch.equal(a, build_random_mask((10, 30), keep=0.1, seed=7, name="w"))
    assert not torch.equal(a, build_random_mask((10, 30), keep=0.1, seed=8, name="w"))
    assert not torch.equal(a, build_random_mask((10, 30), keep=0.1, seed=7, name="v"))
    assert int(build_random_mask((3,), keep=0.01).sum()) == 1  # at least one element may change
    assert bool(build_random_mask((4, 4), keep=1.0).all())


def test_magnitude_mask_keeps_largest_or_smallest() -> None:
    w = torch.tensor([[0.1, -5.0], [3.0, -0.2]])
    assert build_magnitude_mask(w, keep=0.5).tolist() == [[False, True], [True, False]]
    assert build_magnitude_mask(w, keep=0.25, largest=False).tolist() == [[True, False], [False, False]]


def test_index_masks_rows_columns_channels_in_broadcast_shape() -> None:
    w = torch.zeros(4, 3, 2, 2)
    rows = build_mask({"kind": "rows", "index": [1, 3]}, "w", w)
    assert rows.shape == (4, 1, 1, 1) and rows.flatten().tolist() == [False, True, False, True]
    cols = build_mask({"kind": "columns", "index": [2]}, "w", w)
    assert cols.shape == (1, 3, 1, 1) and cols.flatten().tolist() == [False, False, True]
    bias_channels = build_mask({"kind": "channels", "index": [0]}, "b", torch.zeros(4))
    assert bias_channels.tolist() == [True, False, False, False]
    assert count_masked(w, rows) == 2 * 3 * 2 * 2
    with pytest.raises(MaskError, match=r"b has shape \(4,\): no dim 1"):
        build_index_mask((4,), [0], dim=1, name="b")
    with pytest.raises(MaskError, match=r"w: index \[4\] out of range for dim 0 of size 4"):
        build_mask({"kind": "rows", "index": [0, 4]}, "w", w)
    with pytest.raises(MaskError, match=r"w: index \[-5\] out of range for dim 0 of size 4"):
        build_mask({"kind": "rows", "index": [-5]}, "w", w)
    assert torch.equal(build_mask({"kind": "rows", "index": [-1, -3]}, "w", w), rows)  # from the end: rows 3 and 1


@pytest.mark.parametrize(
    ("op", "expected"),
    [(">", [0, 0, 1]), (">=", [0, 1, 1]), ("<", [1, 0, 0]), ("<=", [1, 1, 0]), ("==", [0, 1, 0]), ("!=", [1, 0, 1])],
)
def test_where_mask_ops(op: str, expected: list[int]) -> None:
    w = torch.tensor([-1.0, 0.0, 2.0])
    assert build_where_mask(w, op, 0.0).int().tolist() == expected
    assert is_dynamic_spec({"kind": "where", "op": op, "value": 0}) and not is_dynamic_spec({"kind": "rows"})


def test_build_mask_dispatches_every_kind() -> None:
    w = torch.randn(6, 5)
    specs = {
        "random": {"kind": "random", "keep": 0.5, "seed": 1},
        "magnitude": {"kind": "magnitude", "keep": 0.5},
        "rows": {"kind": "rows", "index": [0]},
        "columns": {"kind": "columns", "index": [0]},
        "channels": {"kind": "channels", "index": [0]},
        "where": {"kind": "where", "op": ">", "value": 0.0},
    }
    assert set(specs) == set(MASK_KINDS)
    for spec in specs.values():
        mask = build_mask(spec, "w", w)
        assert mask.dtype == torch.bool and torch.broadcast_shapes(mask.shape, w.shape) == w.shape
    assert torch.equal(build_mask(specs["random"], "w", w), build_random_mask((6, 5), 0.5, 1, "w"))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"kind": "lottery"}, r"unknown mask kind 'lottery'; valid kinds are 'random', 'magnitude', 'rows'"),
        ({"keep": 0.1}, r"unknown mask kind None"),
        ({"kind": "random", "keep": 0.0}, r"keep=0.0 must be a fraction in \(0, 1\]"),
        ({"kind": "random", "keep": 1.5}, r"keep=1.5 must be a fraction in \(0, 1\]"),
        ({"kind": "magnitude", "keep": -0.1}, r"keep=-0.1 must be a fraction"),
        ({"kind": "random", "keep": True}, r"keep=True must be a fraction"),
        ({"kind": "random"}, r"kind 'random' needs \['keep'\]"),
        ({"kind": "random", "keep": 0.5, "sede": 1}, r"takes \['keep', 'seed'\], not \['sede'\]"),
        ({"kind": "random", "keep": 0.5, "seed": -1}, r"seed=-1 must be a non-negative int"),
        ({"kind": "magnitude", "keep": 0.5, "largest": "yes"}, r"largest='yes' must be true"),
        ({"kind": "rows", "index": []}, r"index=\[\] must be a non-empty list"),
        ({"kind": "rows", "index": [1, 2.5]}, r"must be a non-empty list of ints, e.g. \[0, 5\] \(negative ones"),
        ({"kind": "where", "op": "=>", "value": 0}, r"op='=>' is not one of \['>', '>='"),
        ({"kind": "where", "op": ">", "value": "0"}, r"value='0' must be a number"),
    ],
)
def test_validate_mask_spec_errors(spec: dict, match: str) -> None:
    with pytest.raises(MaskError, match=match):
        validate_mask_spec(spec, where="masks['w']")


def test_as_bool_mask_errors_and_conversion() -> None:
    p = torch.zeros(3, 4)
    assert as_bool_mask(torch.tensor([1.0, 0.0, 1.0, 1.0]), "w", p).dtype == torch.bool
    with pytest.raises(MaskError, match=r"mask of fc.weight has shape \(3,\), .*parameter's shape \(3, 4\)"):
        as_bool_mask(torch.ones(3), "fc.weight", p)
    with pytest.raises(MaskError, match=r"mask of w holds values other than 0/1 \(e.g. \[0.5"):
        as_bool_mask(torch.tensor([0.5, 1.0, 0.0, 2.0]), "w", p)
    with pytest.raises(MaskError, match=r"mask of w is a list; expected a tensor"):
        as_bool_mask([1, 0], "w", p)


# --- kernels ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_mask_gradients_exact_zero_even_for_nan_and_inf(dtype: torch.dtype) -> None:
    p = torch.zeros(2, 4, dtype=dtype, requires_grad=True)
    raw = torch.tensor([[math.nan, math.inf, -math.inf, 1.5], [-0.0, math.nan, 2.0, -math.inf]], dtype=dtype)
    keep = torch.tensor([[False, False, False, True], [True, True, False, False]])
    p.grad = raw.clone()
    mask_gradients([p], [keep])
    assert torch.equal(bits(p.grad)[~keep], torch.zeros(int((~keep).sum()), dtype=bits(p.grad).dtype))  # +0.0 bits
    assert torch.equal(bits(p.grad)[keep], bits(raw)[keep])  # -0.0 and NaN kept bit for bit


def test_mask_gradients_broadcast_numeric_masks_and_missing_grads() -> None:
    a, b = torch.zeros(3, 2, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad = torch.ones(3, 2)
    mask_gradients([a, b], [torch.tensor([[1.0], [0.0], [1.0]]), torch.tensor([True, False])])
    assert a.grad.tolist() == [[1, 1], [0, 0], [1, 1]] and b.grad is None


def test_mask_gradients_rejects_sparse_grads() -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(TypeError, match="sparse=False"):
        mask_gradients([emb.weight], [torch.ones(5, 1, dtype=torch.bool)])


def test_snapshot_restore_bit_identical_including_negative_zero_and_nan() -> None:
    p = torch.tensor([-0.0, math.nan, 1.0, -2.0, math.inf, 0.0])
    before = bits(p).clone()
    keep = torch.tensor([False, False, True, False, True, False])
    snaps = snapshot_masked([p], [keep])
    p.view(torch.int32).add_(12345)  # scramble every element
    after_step = bits(p).clone()
    restore_masked([p], [keep], snaps)
    assert torch.equal(bits(p)[~keep], before[~keep])
    assert torch.equal(bits(p)[keep], after_step[keep])


def _optimizers() -> dict[str, tuple[type, dict]]:
    o = torch.optim
    return {
        "sgd": (o.SGD, dict(lr=0.1)),
        "sgd_momentum_wd": (o.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.1)),
        "sgd_nesterov": (o.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
        "sgd_foreach": (o.SGD, dict(lr=0.1, momentum=0.9, foreach=True)),
        "adam": (o.Adam, dict(lr=0.1, weight_decay=0.1)),
        "adam_amsgrad": (o.Adam, dict(lr=0.1, amsgrad=True)),
        "adamw": (o.AdamW, dict(lr=0.1, weight_decay=0.5)),
        "adamw_fused": (o.AdamW, dict(lr=0.1, weight_decay=0.5, fused=True)),
        "rmsprop": (o.RMSprop, dict(lr=0.1, momentum=0.5, weight_decay=0.1, centered=True)),
        "adagrad": (o.Adagrad, dict(lr=0.1, weight_decay=0.1)),
        "adamax": (o.Adamax, dict(lr=0.1, weight_decay=0.1)),
        "nadam": (o.NAdam, dict(lr=0.1, weight_decay=0.1)),
        "radam": (o.RAdam, dict(lr=0.1, weight_decay=0.1, decoupled_weight_decay=True)),
        "adadelta": (o.Adadelta, dict(lr=1.0, weight_decay=0.1)),
        "asgd": (o.ASGD, dict(lr=0.1, weight_decay=0.1)),
        "rprop": (o.Rprop, dict(lr=0.1)),
    }


def _masked_steps(w: torch.Tensor, opt: torch.optim.Optimizer, keep: torch.Tensor, grads: list[torch.Tensor]) -> None:
    """One masked optimizer step per gradient in ``grads``."""
    for g in grads:
        w.grad = g.clone()
        mask_gradients([w], [keep])
        opt.step()


@pytest.mark.parametrize("name", list(_optimizers()))
def test_guard_freezes_masked_elements_for_every_optimizer(name: str) -> None:
    cls, kwargs = _optimizers()[name]
    w0 = torch.randn(6, 5)
    keep = build_random_mask((6, 5), keep=0.4, seed=0, name="w")
    grads = [torch.randn(6, 5) for _ in range(5)]

    def run(guarded: bool) -> torch.Tensor:
        w = torch.nn.Parameter(w0.clone())
        opt = cls([w], **kwargs)
        handle = guard_masked_elements(opt, lambda: [(w, keep)]) if guarded else None
        _masked_steps(w, opt, keep, grads)
        if handle is not None:
            handle.remove()
            assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
        return w.detach()

    guarded, reference = run(True), run(False)
    assert torch.equal(bits(guarded)[~keep], bits(w0)[~keep])  # masked: bit-identical
    # Element-wise optimizers: unmasked elements follow exactly what gradient masking alone gives them.
    assert torch.equal(bits(guarded)[keep], bits(reference)[keep])
    assert not torch.equal(guarded[keep], w0[keep])
    if name.startswith(("sgd_momentum", "adamw")):
        assert (reference[~keep] - w0[~keep]).abs().max() > 1e-3  # why the guard exists


def test_guard_follows_masks_that_change_between_steps() -> None:
    w = torch.nn.Parameter(torch.randn(20))
    opt = torch.optim.AdamW([w], lr=0.3, weight_decay=0.1)
    current: list[torch.Tensor] = []

    def pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
        current[:] = [w.detach() > 0]  # only positive weights may change, recomputed at every step
        return [(w, current[0])]

    guard_masked_elements(opt, pairs)
    flipped = False
    for _ in range(6):
        before = w.detach().clone()
        w.grad = torch.ones(20)  # pushes weights down: positive ones cross zero and then freeze
        opt.step()
        assert torch.equal(bits(w)[~current[0]], bits(before)[~current[0]])
        flipped |= bool(((before > 0) & (w <= 0)).any())
    assert flipped


def test_guard_only_touches_parameters_of_its_optimizer() -> None:
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([a], lr=1.0, weight_decay=1.0)
    keep = torch.tensor([True, False, True])
    guard_masked_elements(opt, lambda: [(a, keep), (b, keep)])
    b.data.fill_(5.0)
    a.grad = torch.ones(3)
    opt.step()
    assert a.tolist() == [-1.0, 1.0, -1.0] and b.tolist() == [5.0, 5.0, 5.0]


@pytest.mark.parametrize("reuse", [True, False])
def test_guard_keeps_in_place_writes_made_between_steps(reuse: bool) -> None:
    w = torch.nn.Parameter(torch.ones(4))
    keep = torch.tensor([True, False, True, False])
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.1)
    guard_masked_elements(opt, lambda: [(w, keep)], reuse_snapshots=reuse)
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                w[1] = 7.0  # e.g. load_state_dict or a user edit: bumps the version counter, so it is re-read
        if step == 3 and not reuse:
            w.data[3] = 9.0  # .data bypasses the version counter: only reuse_snapshots=False sees it
        w.grad = torch.ones(4)
        mask_gradients([w], [keep])
        opt.step()
    assert w[1].item() == 7.0
    assert w[3].item() == (1.0 if reuse else 9.0)
    assert (w[keep] < 1).all()


# --- second-moment floor (speed: sqrt of exact zeros is slow on CPUs) ---------------------------------------

FLOORED = ["adam", "adam_amsgrad", "adamw", "adamw_fused", "rmsprop", "adagrad", "nadam", "radam"]


@pytest.mark.parametrize("name", list(_optimizers()))
def test_floor_changes_only_masked_second_moments(name: str) -> None:
    cls, kwargs = _optimizers()[name]
    w0 = torch.randn(6, 5)
    keep = build_random_mask((6, 5), keep=0.4, seed=0, name="w")
    grads = [torch.randn(6, 5) for _ in range(4)]

    def run(floored: bool) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        w = torch.nn.Parameter(w0.clone())
        opt = cls([w], **kwargs)
        handle = floor_second_moments(opt, lambda: [(w, keep)]) if floored else None
        _masked_steps(w, opt, keep, grads)
        if handle is not None:
            handle.remove()
            assert not opt._optimizer_step_post_hooks
        return w.detach(), opt

    (w, opt), (w_ref, opt_ref) = run(True), run(False)
    assert torch.equal(bits(w), bits(w_ref))  # every value, masked or not, is what masking alone gives
    keys = second_moment_keys(opt)
    assert bool(keys) == (name in FLOORED)
    state, ref = opt.state[opt.param_groups[0]["params"][0]], opt_ref.state[opt_ref.param_groups[0]["params"][0]]
    for key, value in state.items():
        if key in keys:
            assert torch.equal(bits(value)[keep], bits(ref[key])[keep]), key  # unmasked state untouched
            assert (value[~keep] >= 2.0**-125).all(), key  # masked: a normal float, never 0
        else:  # first moments, steps, ...: bit for bit
            assert torch.equal(bits(value), bits(ref[key])), key


def test_floor_is_refreshed_before_the_moment_decays_out_of_the_normal_range() -> None:
    w = torch.nn.Parameter(torch.ones(4))
    keep = torch.tensor([True, False, True, False])
    opt = torch.optim.Adam([w], lr=0.1, betas=(0.9, 0.5))  # halves every step: refresh every 25 steps
    floor_second_moments(opt, lambda: [(w, keep)])
    seen = []
    for _ in range(60):
        w.grad = torch.tensor([1.0, 0.0, 1.0, 0.0])
        opt.step()
        seen.append(opt.state[w]["exp_avg_sq"][1].item())
    assert min(seen) >= 2.0**-125 and seen[0] == seen[25] == seen[50] == SECOND_MOMENT_FLOOR
    assert seen[24] == SECOND_MOMENT_FLOOR * 0.5**24
    assert w[1].item() == 1.0 and w[3].item() == 1.0  # first moment 0: the update of masked elements is 0


def test_floor_schedule_survives_a_resume_bit_for_bit() -> None:
    keep = torch.tensor([True, False, True, False])
    grads = [torch.tensor([1.0, 0.0, -1.0, 0.0]) * (i + 1) for i in range(40)]

    def fresh() -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        w = torch.nn.Parameter(torch.ones(4))
        opt = torch.optim.AdamW([w], lr=0.01, betas=(0.9, 0.5))
        floor_second_moments(opt, lambda: [(w, keep)])
        return w, opt

    def train(w: torch.nn.Parameter, opt: torch.optim.Optimizer, gs: list[torch.Tensor]) -> None:
        for g in gs:
            w.grad = g.clone()
            opt.step()

    w, opt = fresh()
    train(w, opt, grads)
    w2, opt2 = fresh()
    train(w2, opt2, grads[:17])
    saved_w, saved_opt = w2.detach().clone(), opt2.state_dict()
    w3, opt3 = fresh()
    with torch.no_grad():
        w3.copy_(saved_w)
    opt3.load_state_dict(saved_opt)
    train(w3, opt3, grads[17:])
    assert torch.equal(bits(w3), bits(w))
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(bits(opt3.state[w3][key]), bits(opt.state[w][key])), key


def test_floor_leaves_sgd_alone_and_skips_float16_moments() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    assert len(floor_second_moments(torch.optim.SGD([w], lr=0.1, momentum=0.9), lambda: [(w, w > 0)])) == 0
    h = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = torch.optim.Adam([h], lr=0.1)
    floor_second_moments(opt, lambda: [(h, torch.tensor([True, False, True]))])
    h.grad = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float16)
    opt.step()
    assert opt.state[h]["exp_avg_sq"][1].item() == 0.0
