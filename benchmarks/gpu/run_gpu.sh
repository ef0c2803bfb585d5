#!/usr/bin/env bash
# The GPU run (one NVIDIA GPU, no internet), from the repository root:
#   here:  bash benchmarks/gpu/fetch_wheels.sh          # once: .whl/ with the packages the GPU image lacks
#   there: bash benchmarks/gpu/run_gpu.sh [OUT_DIR [BENCH_ARGS...]]   # through the device tool, carrying .whl
# Prints every figure; also writes OUT_DIR/gpu.json and OUT_DIR/gpu.log.
set -euo pipefail
out="${1:-${OUT:-/tmp/nectar-gpu}}"
shift || true  # the rest goes to bench_gpu.py (e.g. --node-args "--batch-wait 0.5")
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.log"
python3 -c "import torch, transformers, hivemind; print('torch', torch.__version__, 'transformers', transformers.__version__, 'hivemind', hivemind.__version__)" | tee -a "$out/gpu.log"
install_test_tools
# the CUDA-graph decode rounds against eager steps, on this GPU
python3 -m pytest -q -p no:cacheprovider tests/speed/test_cuda_graphs.py 2>&1 | tail -3 | tee -a "$out/gpu.log" || true
python3 benchmarks/bench_gpu.py --model llama2-7b --device cuda --dtype float16 --repeats 5 --sessions 1 16 --push \
  --json "$out/gpu.json" "$@" 2>&1 | grep --line-buffered -v -i "warning" | tee -a "$out/gpu.log"
