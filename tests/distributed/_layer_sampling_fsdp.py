"""LISA, BAdam and AdaptiveFreezing on 2 CPU processes under FSDP2 and DDP (for test_layer_sampling_fsdp.py).

    python tests/distributed/_layer_sampling_fsdp.py OUT_DIR

Reuses the FSDP2 scenarios' model (ShardNet: stem, blocks.0-2, head; blocks sharded one by one) and data (different
per rank); writes ``{name}-{strategy}-rank{r}.pt`` with the full parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lit_partial import LISA, AdaptiveFreezing, BAdam
from tests.distributed._fsdp_scenarios import fit

SCENARIOS = {
    "lisa": lambda: [LISA("blocks.*", n_active=1, interval_steps=2, seed=3)],
    "badam": lambda: [BAdam("blocks.*", switch_every=2, order="ascending")],
    "adaptive_freezing": lambda: [AdaptiveFreezing("blocks.*", every_n_steps=2)],
}

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, factory in SCENARIOS.items():
        for strategy in ("fsdp2", "ddp"):
            fit(strategy, factory(), 2, out / f"{name}-{strategy}-rankRANK.pt")
