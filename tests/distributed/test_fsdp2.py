"""Every callback under FSDP2 (ModelParallelStrategy + fully_shard, 2 CPU processes, gloo) against DDP.

One subprocess runs ``_fsdp_scenarios.py``: each scenario is trained under FSDP2 and under DDP in the same
two processes, and every rank writes its full parameters. The timeout turns a hang (ranks issuing different
collectives) into a failure.

Equality is bit for bit everywhere: with 2 ranks, DDP's all-reduce and FSDP2's reduce-scatter both sum two
gradients (commutative, exact) and divide by 2 (exact), and AdamW is element-wise, so sharding changes no
rounding. Not compared: BatchNorm running statistics of a norm that trains (``plain_norm``): DDP broadcasts
rank 0's buffers before every forward, FSDP2 never syncs buffers, so they differ by design of the strategies
(each rank keeps its own, as with DDP's ``broadcast_buffers=False``). Frozen norms keep their statistics under
both. Not covered here (they change rounding, so equality would be approximate): gradient clipping by norm
(FSDP2 sums per-shard norms), more than 2 ranks, mixed precision.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

SCRIPT = Path(__file__).with_name("_fsdp_scenarios.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600  # all scenarios under both strategies take ~1-2 min on 2 shared cores; a hang hits this

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TIMEOUT_S + 120)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(
            f"the 2-process FSDP2/DDP runs did not end within {TIMEOUT_S} s (a hang?):\n{err.stdout}{err.stderr}"
        )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return out


def load(runs: Path, name: str, strategy: str, rank: int = 0) -> dict[str, Any]:
    return torch.load(runs / f"{name}-{strategy}-rank{rank}.pt", weights_only=False)  # type: ignore[no-any-return]


def params_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: different keys {set(a) ^ set(b)}"
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diffs, f"{what}: entries differ (max |a - b|): {diffs}"


COMPARED = ["plain", "plain_norm", "freezing", "masking", "detach", "skip", "skip_per_sample", "activations"]
COMPARED += ["selective", "monitor"]
COMPARED += ["drop_backward"]  # #23: the same drop set on every rank; FSDP2 does not hang and equals DDP


#: Scenarios trained like ``plain`` (2 epochs, no BatchNorm) whose technique changes the result.
CHANGES_TRAINING = ["masking", "detach", "skip", "skip_per_sample", "activations", "selective"]
CHANGES_TRAINING += ["drop_backward"]


@pytest.mark.parametrize("name", COMPARED)
def test_fsdp2_parameters_equal_ddp_bit_for_bit(runs: Path, name: str) -> None:
    fsdp2, ddp = load(runs, name, "fsdp2"), load(runs, name, "ddp")
    assert_bitwise_equal(params_only(fsdp2["state"]), params_only(ddp["state"]), f"{name}: FSDP2 vs DDP")
    assert not torch.equal(fsdp2["state"]["head.weight"], fsdp2["initial"]["head.weight"]), "nothing trained"
    assert fsdp2["extra"] == ddp["extra"], f"{name}: the callbacks counted differently"
    # Equal under both strategies proves little if the technique did nothing under both: check that it acted.
    if name in CHANGES_TRAINING:
        plain = load(runs, "plain", "fsdp2")["state"]
        assert any(not torch.equal(v, plain[k]) for k, v in fsdp2["state"].items()), f"{name}: same as plain training"
    if name == "activations":
        layers = [f"blocks.{b}.{m}" for b in (1, 2) for m in ("act", "fc1", "fc2")]
        recomputed = fsdp2["extra"]["recomputed"]
        assert recomputed and all(names == layers for names in recomputed), "checkpointing recomputed nothing"
    if name == "monitor":
        assert fsdp2["extra"]["saved_bytes"] and min(fsdp2["extra"]["saved_bytes"]) > 0, "the monitor measured nothing"


@pytest.mark.parametrize("name", [*COMPARED, "per_rank_statistic"])
def test_ranks_hold_the_same_full_parameters(runs: Path, name: str) -> None:
    ranks = [params_only(load(runs, name, "fsdp2", r)["state"]) for r in (0, 1)]
    assert_bitwise_equal(ranks[0], ranks[1], f"{name}: rank 0 vs rank 1 under FSDP2")


def test_layer_freezing_keeps_frozen_modules_and_their_norm_statistics_bit_identical(runs: Path) -> None:
    fsdp2, ddp = load(runs, "freezing", "fsdp2"), load(runs, "freezing", "ddp")
    stem = {k: v for k, v in fsdp2["state"].items() if k.startswith("stem.")}  # frozen all run, BatchNorm included
    assert len(stem) == 7
    assert_bitwise_equal(stem, {k: fsdp2["initial"][k] for k in stem}, "frozen stem vs its initial values")
    assert_bitwise_equal(fsdp2["state"], ddp["state"], "FSDP2 vs DDP (buffers included: the norm is frozen)")
    # The planned groups (lr_scale per schedule entry) and the final frozen set are the same as under DDP.
    groups = fsdp2["extra"]["param_groups"]
    assert [g for g, _ in groups] == ["trainable", "unfreeze@epoch1", "unfreeze@step7", "frozen"]
    assert groups[1][1] == pytest.approx(0.005) and groups[2][1] == pytest.approx(0.025)
    assert not any(n.startswith(("stem.", "blocks.2.")) for n in fsdp2["extra"]["trainable"])


def test_gradient_masking_masked_elements_stay_bit_identical_under_adamw(runs: Path) -> None:
    fsdp2, ddp = load(runs, "masking", "fsdp2"), load(runs, "masking", "ddp")
    assert fsdp2["masks"].keys() == ddp["masks"].keys()
    for name, mask in fsdp2["masks"].items():
        if name == "blocks.2.fc2.weight":  # the "where" mask follows the weights: compare the last ones
            continue
        assert torch.equal(mask, ddp["masks"][name]), f"{name}: FSDP2 and DDP masks differ"
        frozen = ~mask.expand_as(fsdp2["state"][name])
        assert frozen.any(), name
        now, before = fsdp2["state"][name][frozen], fsdp2["initial"][name][frozen]
        assert torch.equal(now, before), f"{name}: a masked element moved under FSDP2"
        kept = mask.expand_as(fsdp2["state"][name])
        assert not torch.equal(fsdp2["state"][name][kept], fsdp2["initial"][name][kept]), f"{name}: nothing learned"
    # "where > 0" is computed per shard from the current weights; an element that is <= 0 never changes again.
    name = "blocks.2.fc2.weight"
    nonpositive = fsdp2["initial"][name] <= 0
    assert torch.equal(fsdp2["state"][name][nonpositive], fsdp2["initial"][name][nonpositive])
    assert torch.equal(fsdp2["masks"][name], fsdp2["state"][name] > 0)


def test_per_rank_statistic_is_decided_once_for_all_ranks_without_hanging(runs: Path) -> None:
    # Reaching here means both strategies finished: under FSDP2 no rank skipped a collective the other issued.
    fsdp2 = [load(runs, "per_rank_statistic", "fsdp2", r)["extra"] for r in (0, 1)]
    ddp = [load(runs, "per_rank_statistic", "ddp", r)["extra"] for r in (0, 1)]
    assert ddp[0] != ddp[1], "control: under DDP the statistic rules must decide differently per rank"
    assert fsdp2[0] == fsdp2[1], "under FSDP2 every rank must take the same decisions"


@pytest.mark.parametrize("strategy", ["fsdp2", "fsdp2-full", "ddp"])
def test_resume_from_a_mid_schedule_checkpoint_equals_the_straight_run(runs: Path, strategy: str) -> None:
    # LayerFreezing (unfreezes at epochs 1 and 3), GradientMasking (random, magnitude, where), StochasticDepth and
    # SelectiveBackprop (per-rank pools); checkpoint after epoch 2: under FSDP2 a sharded checkpoint folder, or
    # (fsdp2-full) one file with the full state. Without LayerFreezing's own read of the optimizer state of
    # blocks.1 (frozen in setup, unfrozen at epoch 1), Lightning's restore drops its AdamW moments (both formats).
    for rank in (0, 1):
        straight = load(runs, "resume", f"{strategy}-straight", rank)
        resumed = load(runs, "resume", f"{strategy}-resumed", rank)
        assert_bitwise_equal(straight["state"], resumed["state"], f"rank {rank}: resumed vs straight under {strategy}")
        assert resumed["extra"] == straight["extra"], f"rank {rank}: the callbacks' counters did not resume"
    # Equal to the straight run proves little if the callbacks did nothing in either: check that they acted.
    extra = resumed["extra"]
    assert [lr for _, lr in extra["param_groups"]] == pytest.approx([0.05, 0.005, 0.025])  # lr_scale 0.1 and 0.5
    for name in ("blocks.1.fc1.weight", "head.weight"):  # static masks: the masked elements never moved
        frozen = ~resumed["masks"][name].expand_as(resumed["state"][name])
        assert frozen.any() and torch.equal(resumed["state"][name][frozen], resumed["initial"][name][frozen]), name
    assert any(extra["fractions/StochasticDepth"].values()), "StochasticDepth skipped no block"
    forward_samples, backward_samples = extra["selected"]
    assert backward_samples < forward_samples / 2, "SelectiveBackprop trained on every sample"
    if strategy == "fsdp2":
        assert (runs / "resume-fsdp2-epoch2.ckpt").is_dir(), "expected Lightning's sharded checkpoint folder"
        ddp = load(runs, "resume", "ddp-straight")["state"]
        assert_bitwise_equal(load(runs, "resume", "fsdp2-straight")["state"], ddp, "FSDP2 vs DDP, all callbacks")
