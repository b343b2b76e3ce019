"""Tensor-level tools, usable without Lightning: the mechanisms behind every callback.

Names are verbs (``freeze``, ``mask_gradients``, ``detach_if``, ...); the callbacks in
:mod:`lit_partial.callbacks` add only timing, state and logging on top of them.
"""

from __future__ import annotations

from lit_partial.functional.activation_cuts import (
    UnsafeCheckpointError,
    checkpoint_modules,
    detach_outputs,
    offload_modules,
)
from lit_partial.functional.activations import SavedTensorTracker, saved_activation_bytes
from lit_partial.functional.adaptive_freezing import freeze_start, gradient_change
from lit_partial.functional.drop_backward import (
    allocate_drop_rates,
    draw_drop_set,
    drop_branch_outputs,
    weighted_drop_rate,
)
from lit_partial.functional.freezing import (
    freeze,
    frozen_parameter_names,
    hold_norm_statistics,
    trainable_parameter_count,
    unfreeze,
)
from lit_partial.functional.frozen_checkpointing import frozen_aware_checkpointing
from lit_partial.functional.gradients import detach_if, reverse_grad, scale_grad, skip_rows, straight_through
from lit_partial.functional.layer_sampling import (
    active_block,
    drop_optimizer_state,
    optimizer_state_bytes,
    sample_layers,
)
from lit_partial.functional.mask_builders import (
    MaskError,
    build_index_mask,
    build_magnitude_mask,
    build_mask,
    build_random_mask,
    build_where_mask,
)
from lit_partial.functional.masking import (
    count_masked,
    floor_second_moments,
    guard_masked_elements,
    mask_gradients,
    restore_masked,
    snapshot_masked,
)
from lit_partial.functional.measure import count_flops
from lit_partial.functional.selection_sampling import (
    SamplePool,
    UnsupportedBatchError,
    batch_size_of,
    concat_batches,
    num_kept,
    probability_beta,
    select_outliers,
    select_probability,
    select_topk,
    selection_probabilities,
    slice_batch,
    take_pooled,
    update_history,
)
from lit_partial.functional.selective_checkpoint import live_forward_bytes, resolve_policy, selective_context_fn
from lit_partial.functional.spectrum import spectrum_frozen, spectrum_snr, spectrum_trainable
from lit_partial.functional.token_selection import (
    masked_token_mean,
    num_kept_tokens,
    select_tokens,
    token_losses,
    token_scores,
)

__all__ = [
    "MaskError",
    "SamplePool",
    "SavedTensorTracker",
    "UnsafeCheckpointError",
    "UnsupportedBatchError",
    "active_block",
    "batch_size_of",
    "build_index_mask",
    "build_magnitude_mask",
    "build_mask",
    "build_random_mask",
    "build_where_mask",
    "checkpoint_modules",
    "concat_batches",
    "count_flops",
    "count_masked",
    "detach_if",
    "detach_outputs",
    "drop_optimizer_state",
    "floor_second_moments",
    "freeze",
    "freeze_start",
    "frozen_parameter_names",
    "gradient_change",
    "guard_masked_elements",
    "hold_norm_statistics",
    "mask_gradients",
    "num_kept",
    "offload_modules",
    "optimizer_state_bytes",
    "probability_beta",
    "restore_masked",
    "reverse_grad",
    "sample_layers",
    "saved_activation_bytes",
    "scale_grad",
    "select_outliers",
    "select_probability",
    "select_topk",
    "selection_probabilities",
    "skip_rows",
    "slice_batch",
    "snapshot_masked",
    "spectrum_frozen",
    "spectrum_snr",
    "spectrum_trainable",
    "straight_through",
    "take_pooled",
    "trainable_parameter_count",
    "unfreeze",
    "update_history",
]

__all__ += ["masked_token_mean", "num_kept_tokens", "select_tokens", "token_losses", "token_scores"]
__all__ += ["allocate_drop_rates", "draw_drop_set", "drop_branch_outputs", "weighted_drop_rate"]
__all__ += ["frozen_aware_checkpointing", "live_forward_bytes", "resolve_policy", "selective_context_fn"]
