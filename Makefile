# Two commands on a fresh machine: `make train` and `make test`. Both install what is missing first, into the
# active virtual environment, or else into a project one (.venv) made with python3: Debian/Ubuntu's system
# Python refuses `pip install` outside a virtual environment (PEP 668, "externally-managed-environment").
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
OVERRIDES ?=
# pytest-xdist workers for `make test` (each test module runs whole on one worker; 0 = no xdist).
TEST_WORKERS ?= 2
# The presets `make compare` runs side by side (one Hydra multirun, then comparison.md/.png in the sweep folder).
COMPARE ?= none,freeze_backbone,freeze_then_unfreeze,gradual_unfreeze,detach_backbone_warmup,sparse_finetune,checkpoint_backbone,selective_backprop

VENV := $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
# pyproject.toml decides what each stamp installs; editing it reinstalls.
STAMP_TRAIN := $(VENV)/.lit_partial-train
STAMP_TEST := $(VENV)/.lit_partial-test
STAMP_DEV := $(VENV)/.lit_partial-dev
STAMP_DOCS := $(VENV)/.lit_partial-docs

.PHONY: venv train compare test lint typecheck bench docs clean-venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

venv: $(VENV)/bin/python

# torch first and pinned: an unpinned resolve would pull a newer CUDA build (gigabytes). The extras then
# find `torch>=2.2` satisfied and keep it.
$(VENV)/.torch: | $(VENV)/bin/python
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	@touch $@

$(STAMP_TRAIN): pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[demo]"
	@touch $@

# badam (tests/callbacks/test_badam.py compares BAdam with its BlockOptimizer bit for bit) without its
# dependencies: they would re-resolve torch, transformers and more.
BADAM := badam==1.4

$(STAMP_TEST): pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m pip install --quiet --no-deps "$(BADAM)"
	@touch $@ $(STAMP_TRAIN)

$(STAMP_DEV): pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "$(BADAM)"
	@touch $@ $(STAMP_TEST) $(STAMP_TRAIN)

$(STAMP_DOCS): pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[docs]"
	@touch $@

train: $(STAMP_TRAIN)  ## pretrain on digits 0-4 (cached), fine-tune on 5-9 with the backbone frozen for epoch 0
	$(PY) scripts/train.py partial=freeze_then_unfreeze $(OVERRIDES)

compare: $(STAMP_TRAIN)  ## every preset of COMPARE on the same job, then the accuracy-vs-cost report
	$(PY) scripts/train.py -m partial=$(COMPARE) $(OVERRIDES)

test: $(STAMP_TEST)
	$(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope)

lint: $(STAMP_DEV)
	$(PY) -m ruff check lit_partial benchmarks examples tests scripts
	$(PY) -m ruff format --check lit_partial benchmarks examples tests scripts
	$(VENV)/bin/lint-imports  ## the one-way layers of [tool.importlinter] in pyproject.toml

typecheck: $(STAMP_DEV)
	$(PY) -m mypy lit_partial

bench: $(STAMP_TRAIN)  ## the measured claims (benchmarks/, a checkout only): every section, results in benchmark_results/
	$(PY) -m benchmarks

docs: $(STAMP_DOCS)  ## the documentation site (docs/), warnings are errors: HTML in docs/_build/html
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean-venv:
	rm -rf .venv

# The LLM job (experiment=lm, docs/lm_job.md): a byte-level Llama pretrained on Python source (cached), fine-tuned
# on English prose with each preset of COMPARE_LM; one Hydra multirun, then comparison.md/.png in the sweep folder.
COMPARE_LM ?= none,lm/freeze_bottom,lm/freeze_tuning,lm/detach_bottom,lm/lora,[lm/lora,lora_fa],lm/checkpoint,lm/selective_checkpoint,lm/lisa,lm/badam,lm/adaptive_freezing,lm/drop_backward,lm/token_selection,lm/checkpoint_matmul
STAMP_LM := $(VENV)/.lit_partial-lm

$(STAMP_LM): pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[demo,hf]"
	@touch $@ $(STAMP_TRAIN)

.PHONY: compare-lm
compare-lm: $(STAMP_LM)  ## every LLM preset of COMPARE_LM on the same job, then the bits-per-byte-vs-cost report
	$(PY) scripts/train.py -m experiment=lm 'partial=$(COMPARE_LM)' $(OVERRIDES)
