"""One test per private torch/Lightning name in lit_partial/_compat.py: each fails naming the name and version.

If one of these fails after an upgrade, update lit_partial/_compat.py (and only it) for the new release.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import lightning
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lit_partial import _compat

VERSIONS = f"torch {torch.__version__}, lightning {lightning.__version__}"


def upgrade(name: str) -> str:
    return f"{name} changed ({VERSIONS}): update lit_partial/_compat.py"


def test_version_counter_tracks_in_place_writes() -> None:
    assert hasattr(torch.Tensor, "_version"), upgrade("Tensor._version")
    t = torch.zeros(3)
    before = _compat.version_counter(t)
    t.add_(1)
    assert _compat.version_counter(t) == before + 1, upgrade("Tensor._version")


def test_view_base_finds_the_viewed_tensor() -> None:
    w = nn.Parameter(torch.ones(2, 3))
    assert _compat.view_base(w.t()) is w, upgrade("Tensor._base")
    assert _compat.view_base(torch.ones(2)) is None, upgrade("Tensor._base")


@pytest.mark.parametrize(
    "module",
    [nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.SyncBatchNorm(2), nn.InstanceNorm2d(2, track_running_stats=True)],
)
def test_norm_base_covers_running_stats_norms(module: nn.Module) -> None:
    assert _compat.is_running_stats_norm(module), upgrade("torch.nn.modules.batchnorm._NormBase")


def test_norm_base_excludes_norms_without_running_stats() -> None:
    assert not _compat.is_running_stats_norm(nn.InstanceNorm2d(2)), upgrade("_NormBase.track_running_stats")
    assert not _compat.is_running_stats_norm(nn.LayerNorm(2)), upgrade("_NormBase")


def test_foreach_mul_multiplies_in_place() -> None:
    assert hasattr(torch, "_foreach_mul_"), upgrade("torch._foreach_mul_")
    a, b = [torch.ones(2), torch.ones(3)], [torch.full((2,), 2.0), torch.zeros(3)]
    _compat.foreach_mul_(a, b)
    assert a[0].tolist() == [2.0, 2.0] and a[1].tolist() == [0.0, 0.0, 0.0], upgrade("torch._foreach_mul_")


def test_non_finite_check_and_unscale_flags_infinities() -> None:
    assert hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_"), upgrade("_amp_foreach_non_finite_...")
    found = torch.zeros(1)
    grads = [torch.tensor([1.0, float("inf")])]
    _compat.non_finite_check_and_unscale_(grads, found, torch.ones(()))
    assert found.item() == 1.0, upgrade("torch._amp_foreach_non_finite_check_and_unscale_")


def test_grad_scaler_keeps_per_optimizer_inf_flags() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0)
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler.scale(p.sum()).backward()
    scaler.unscale_(opt)
    found = _compat.scaler_found_inf_per_device(scaler, opt)
    assert set(found) == {torch.device("cpu")}, upgrade("GradScaler._per_optimizer_states['found_inf_per_device']")


def test_grad_scaler_structure_change_is_loud() -> None:
    class Changed:
        pass

    with pytest.raises(RuntimeError, match=r"_per_optimizer_states.*lit_partial/_compat\.py"):
        _compat.scaler_found_inf_per_device(Changed(), torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1))


def test_ddp_kwargs_are_the_options_passed_to_ddp() -> None:
    strategy = DDPStrategy(find_unused_parameters=False)
    kwargs = _compat.ddp_kwargs(strategy)
    assert kwargs == {"find_unused_parameters": False}, upgrade("DDPStrategy._ddp_kwargs")
    kwargs["find_unused_parameters"] = True
    assert _compat.ddp_kwargs(strategy)["find_unused_parameters"] is True, upgrade("DDPStrategy._ddp_kwargs")
    with pytest.raises(RuntimeError, match=r"has no `_ddp_kwargs` dict"):
        _compat.ddp_kwargs(object())


def test_ddp_ignored_names_are_what_ddp_reads() -> None:
    from torch.nn.parallel import DistributedDataParallel

    module = nn.Linear(1, 1)
    _compat.set_ddp_ignored_names(module, ["weight"])
    # torch's own (private) setter writes the same attribute name: if it changes, DDP ignores nothing of ours.
    other = nn.Linear(1, 1)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(other, ["weight"])
    assert _compat.ddp_ignored_names(other) == ["weight"], upgrade("_ddp_params_and_buffers_to_ignore")
    assert _compat.ddp_ignored_names(module) == ["weight"]
    _compat.set_ddp_ignored_names(module, [])
    assert _compat.DDP_IGNORE_ATTR not in module.__dict__


def test_named_tree_equals_named_parameters_with_aliases() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), nn.BatchNorm1d(2))
    model[1][0].weight = model[0].weight  # a tied weight: two names, one parameter
    modules, params = _compat.named_tree(model)
    expected = list(model.named_parameters(remove_duplicate=False))
    assert [(n, id(p)) for n, p in params] == [(n, id(p)) for n, p in expected], upgrade("Module._parameters")
    assert modules == [n for n, _ in model.named_modules(remove_duplicate=False) if n]


def test_lightning_restores_optimizer_states_from_the_dict_callbacks_got_in_on_load_checkpoint(tmp_path: Path) -> None:
    # LayerFreezing(accept_config_change=True) rewrites checkpoint["optimizer_states"] and ["lr_schedulers"] in
    # on_fit_start (where its groups are built) in the dict it got in on_load_checkpoint: public hooks, but it relies
    # on Lightning keeping that dict and restoring optimizer and scheduler states from it after on_fit_start.
    from lightning.pytorch.demos.boring_classes import BoringModel

    class Rewrite(lightning.Callback):
        checkpoint: dict[str, Any] | None = None

        def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
            self.checkpoint = checkpoint

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            if self.checkpoint is not None:
                self.checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] = 0.123
                self.checkpoint["lr_schedulers"][0]["last_epoch"] = 41

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.seen = (
                trainer.optimizers[0].param_groups[0]["lr"],
                trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            )

    def fit(epochs: int, ckpt: object = None) -> tuple[lightning.Trainer, Rewrite]:
        probe = Rewrite()
        trainer = lightning.Trainer(
            max_epochs=epochs,
            limit_train_batches=2,
            limit_val_batches=0,
            callbacks=[probe],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(BoringModel(), ckpt_path=ckpt)
        return trainer, probe

    trainer, _ = fit(1)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    _, probe = fit(2, tmp_path / "a.ckpt")
    assert probe.seen == (0.123, 41), upgrade(
        "the checkpoint dict of Callback.on_load_checkpoint, restored after on_fit_start"
    )


def test_fully_shard_swaps_a_module_class_for_an_fsdp_subclass_that_keeps_the_name() -> None:
    import subprocess
    import sys

    from torch.distributed.fsdp import FSDPModule

    script = (
        "import os, torch, torch.distributed as dist\n"
        "from torch.distributed.fsdp import fully_shard\n"
        "from torch.distributed.device_mesh import init_device_mesh\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29531')\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "layer = torch.nn.Linear(2, 2)\n"
        "fully_shard(layer, mesh=init_device_mesh('cpu', (1,)))\n"
        "print(type(layer).__name__, [base.__qualname__ for base in type(layer).__bases__])\n"
        "dist.destroy_process_group()\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.stdout.strip() == "FSDPLinear ['FSDPModule', 'Linear']", upgrade(f"fully_shard's class: {done.stderr}")
    sharded = type("FSDPLinear", (FSDPModule, nn.Linear), {})  # what fully_shard makes, as the run above shows
    assert _compat.module_class_names(sharded) == ("FSDPLinear", "Linear")
    assert _compat.module_class_names(nn.Linear) == ("Linear",)


def test_hugging_face_layers_keep_their_checkpoint_function_where_lit_partial_replaces_it() -> None:
    transformers = pytest.importorskip("transformers")
    from lit_partial._compat import HF_CHECKPOINT_FUNC_ATTR, hf_checkpoint_layers

    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg)
    assert hf_checkpoint_layers(model) == []
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    layers = dict(hf_checkpoint_layers(model))
    assert {"model.layers.0", "model.layers.1"} <= set(layers), (
        f"transformers {transformers.__version__}: layers no longer keep `{HF_CHECKPOINT_FUNC_ATTR}`; update "
        "lit_partial/_compat.py"
    )
    assert all(callable(m.__dict__[HF_CHECKPOINT_FUNC_ATTR]) for m in layers.values())


def test_foreach_add_adds_in_place() -> None:
    assert hasattr(torch, "_foreach_add_"), upgrade("torch._foreach_add_")
    a, b = [torch.ones(2), torch.ones(3)], [torch.full((2,), 2.0), torch.zeros(3)]
    _compat.foreach_add_(a, b)
    assert a[0].tolist() == [3.0, 3.0] and a[1].tolist() == [1.0, 1.0, 1.0], upgrade("torch._foreach_add_")


def _sentinel_below_a_detach(counter: Any) -> bool:
    """Whether the graph below a ``.detach()`` still lives after a forward run under ``counter``."""

    class Token:
        pass

    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, token: Token) -> torch.Tensor:
            ctx.token = token
            return x.clone()

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
            return grad, None

    class Low(nn.Module):  # its output (the sentinel's) is what a module tracker would hook
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return Keep.apply(x, tokens.pop())  # type: ignore[no-any-return]

    tokens = [Token()]
    ref = weakref.ref(tokens[0])
    low, high = nn.Sequential(nn.Linear(3, 3), Low()), nn.Linear(3, 1)
    with counter:
        out = high(low(torch.randn(2, 3)).detach()).sum()
        alive = ref() is not None
        out.backward()
    return alive


def test_flop_counter_module_tracking_keeps_cut_graphs_and_total_flop_counter_does_not() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    assert hasattr(FlopCounterMode(display=False), "mod_tracker"), f"torch {torch.__version__} renamed mod_tracker"
    # The reason for the accessor: torch's module tracking holds the grad_fns of every module's inputs and outputs.
    assert _sentinel_below_a_detach(FlopCounterMode(display=False))
    assert not _sentinel_below_a_detach(_compat.total_flop_counter())
    # ... and the total stays the one FlopCounterMode counts, forward and backward.
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(3, 4)
    counts = []
    for counter in (FlopCounterMode(display=False), _compat.total_flop_counter()):
        with counter:
            model(x).sum().backward()
        counts.append(counter.get_total_flops())
    # forward and both weight gradients: 3 x 2*3*(4*5 + 5*2); the input gradient of the second Linear only
    assert counts[0] == counts[1] == 3 * 2 * 3 * (4 * 5 + 5 * 2) - 2 * 3 * 4 * 5


def test_total_flop_counter_refuses_a_torch_without_mod_tracker(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import flop_counter

    class Bare:
        def __init__(self, display: bool) -> None:
            pass

    monkeypatch.setattr(_compat, "FlopCounterMode", Bare)
    with pytest.raises(RuntimeError, match=r"FlopCounterMode has no `mod_tracker`"):
        _compat.total_flop_counter()
    assert flop_counter.FlopCounterMode is not Bare


def test_activation_memory_budget_is_torchs_partitioner_setting() -> None:
    import torch._functorch.config as functorch_config

    name = "torch._functorch.config.activation_memory_budget"
    assert hasattr(functorch_config, "activation_memory_budget"), upgrade(name)
    before = _compat.activation_memory_budget()
    assert before == functorch_config.activation_memory_budget, upgrade(name)
    try:
        assert _compat.set_activation_memory_budget(0.25) == before
        assert functorch_config.activation_memory_budget == 0.25, upgrade(name)
        assert _compat.activation_memory_budget() == 0.25
    finally:
        _compat.set_activation_memory_budget(before)
    assert _compat.activation_memory_budget() == before


def test_compiled_parts_sees_each_way_of_compiling() -> None:
    from lightning.pytorch.utilities.compile import from_compiled, to_uncompiled

    from tests.helpers.models import TinyNet

    model = TinyNet()
    assert _compat.compiled_parts(model) == []
    model.compile()
    assert _compat.compiled_call_impl(model) is not None, upgrade("nn.Module._compiled_call_impl")
    assert _compat.compiled_parts(model) == [""]
    model = TinyNet()
    wrapped = torch.compile(model)
    assert isinstance(wrapped, _compat.optimized_module_type()), upgrade("torch._dynamo.eval_frame.OptimizedModule")
    unwrapped = from_compiled(wrapped)  # what Trainer.fit does with torch.compile(model)
    assert _compat.lightning_compiler_ctx(unwrapped) is not None, upgrade("LightningModule._compiler_ctx")
    assert _compat.compiled_parts(unwrapped) == [""]
    assert _compat.compiled_parts(to_uncompiled(unwrapped)) == []
    model = TinyNet()
    model.blocks = torch.compile(model.blocks)  # type: ignore[assignment]
    assert _compat.compiled_parts(model) == ["blocks"]
