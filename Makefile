# make demo | make test | make lint | make validate-deploy | make bench     (each installs what is missing first)
PYTHON ?= python3
# The torch build to install when none is present; override for your platform, e.g.
#   make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test lint validate-deploy bench

install:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server; }
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PYTHON) -m pip install -q $(TORCH_SPEC)
	@$(PYTHON) -m pip install -q -e ".[worker,test,dev]"
	@! command -v npm >/dev/null || [ -d tests/node/node_modules ] || npm ci --prefix tests/node --no-audit --no-fund

demo: install
	vlmq demo

lint: install validate-deploy
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

# Dockerfiles (hadolint), docker/compose.yaml and infra/k8s (schemas, kustomize builds), offline.
validate-deploy: install
	$(PYTHON) infra/validate.py

test: lint
	$(PYTHON) -m pytest

bench: install
	$(PYTHON) bench/throughput.py
