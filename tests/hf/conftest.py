"""Hugging Face tests: tiny models built from configs (random weights, nothing downloaded).

Every test module here starts with ``pytest.importorskip("transformers")`` (and ``"peft"`` where needed), so the
directory is skipped cleanly, with a reason, when the test extras are not installed.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
