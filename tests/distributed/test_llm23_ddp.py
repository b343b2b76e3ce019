"""Two ranks (ddp_spawn, gloo): DropBackward drops the same branches on every rank; TokenSelection(scope="global")
gives the parameters of one process selecting over both ranks' tokens together."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_partial.functional.token_selection import select_tokens, token_losses
from tests.callbacks.test_token_selection import LM
from tests.helpers.ddp_scripts.llm23 import samples
from tests.helpers.trainers import load_rank_states

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_drop_sets_agree_across_ranks_and_global_token_selection_is_exact(tmp_path: Path) -> None:
    script = "tests.helpers.ddp_scripts.llm23"
    subprocess.run([sys.executable, "-m", script, str(tmp_path)], check=True, timeout=280, cwd=REPO)
    drops = [json.loads((tmp_path / f"drops{r}.json").read_text()) for r in range(2)]
    assert drops[0] == drops[1] and len(drops[0]) == 3 and all(len(d) >= 3 for d in drops[0])
    states = load_rank_states(tmp_path)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    # By hand, one process: the batch of both ranks in rank order, top-k over all their valid tokens, masked mean.
    items = samples()
    rank_order = [items[i] for i in (0, 2, 4, 1, 3, 5)]
    batch = {k: torch.stack([s[k] for s in rank_order]) for k in rank_order[0]}
    torch.manual_seed(0)
    model = LM()
    losses, valid = token_losses(model.net(batch["input_ids"]), batch["labels"])
    kept = select_tokens(losses.detach(), valid, 0.3)
    (losses[kept].sum() / kept.sum()).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad  # type: ignore[operator]
    lm = [torch.load(tmp_path / f"lm{r}.pt") for r in range(2)]
    for name, p in model.state_dict().items():
        assert torch.equal(lm[0][name], lm[1][name])
        torch.testing.assert_close(lm[0][name], p, rtol=1e-5, atol=1e-6)
