"""Saved-activation bytes of one training forward of the LLM job's ByteLM, counted two ways, per checkpointing preset.

``SavedTensorTracker`` counts what autograd saves through saved-tensor hooks (what ``CostMonitor`` reports);
``live_forward_bytes`` counts every storage the forward's ops created that is still alive when it returns, which
includes the outputs selective checkpointing (``policy=``) caches inside the checkpoint, invisible to the hooks.
The job's size: 8 layers, width 128, a batch of 16 blocks of 64 bytes. Run ``python scripts/lm_saved_bytes.py``.
"""

from __future__ import annotations

import torch

from lit_partial.demos import ByteLM
from lit_partial.functional.activation_cuts import checkpoint_modules
from lit_partial.functional.activations import SavedTensorTracker
from lit_partial.functional.selective_checkpoint import live_forward_bytes

PRESETS = (  # (partial=, checkpointed modules, policy)
    ("none", None, None),
    ("lm/checkpoint", "model.model.layers.*", None),
    ("lm/selective_checkpoint", "model.model.layers.*.mlp", None),
    ("lm/checkpoint_matmul", "model.model.layers.*", "matmul"),
)


def main() -> None:
    torch.manual_seed(0)
    model = ByteLM()
    batch = (torch.randint(0, 256, (16, 65)),)

    def loss() -> torch.Tensor:
        return model.per_sample_loss(batch).mean()

    print("| preset | saved-tensor hooks KiB | live after forward KiB |\n|---|---|---|")
    for name, selectors, policy in PRESETS:
        handles = checkpoint_modules(model, selectors, policy=policy) if selectors else None
        with SavedTensorTracker(exclude=[model]) as tracker:
            out = loss()
            hooks = tracker.live_bytes()
        del out
        live = live_forward_bytes(loss, exclude=[model, batch[0]])
        print(f"| {name} | {hooks / 1024:,.0f} | {live / 1024:,.0f} |")
        if handles is not None:
            handles.remove()


if __name__ == "__main__":
    main()
