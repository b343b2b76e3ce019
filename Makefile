# Two commands on a fresh machine: `make train` and `make test`. Both install what is missing first.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
OVERRIDES ?=

.PHONY: install train test lint bench

# torch is installed pinned and first: an unpinned resolve would pull a newer CUDA build (gigabytes).
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install --quiet -e ".[dev]"

train: install
	$(PYTHON) scripts/train.py partial=freeze_then_unfreeze $(OVERRIDES)

test: install
	$(PYTHON) -m pytest

lint: install
	ruff check lit_partial scripts tests
	ruff format --check lit_partial scripts tests

bench: install
	$(PYTHON) scripts/benchmark.py
