#!/usr/bin/env bash
# The first GPU call for nf4 nodes' recorded rounds (stop 38's code, not yet run on a GPU), from the repository root:
#   here:  bash benchmarks/gpu/fetch_wheels.sh && bash benchmarks/gpu/fetch_wheels.sh --bnb   # .whl/ and .bnb/
#   there: bash benchmarks/gpu/run_nf4_check.sh OUT_DIR   # through the device tool, carrying .whl and .bnb
# In order of what matters if the call is cut short: the nf4 CUDA tests (recorded rounds of one and six nf4
# sessions equal eager steps; the scratch's products equal bitsandbytes' bit for bit) and the Triton route's, then
# the Llama-2-7B-shaped nf4 checkpoint on one node, 1 and 16 sessions, on the Triton route and then on the eager one.
# About 7 minutes on an H100 (the checkpoint is drawn on the GPU the first time). Writes OUT_DIR/nf4_check.log and
# OUT_DIR/gpu_nf4_7b_<route>.json.
set -uo pipefail
out="${1:-${OUT:-/tmp/nectar-gpu}}"
mkdir -p "$out"
log="$out/nf4_check.log"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_bitsandbytes
install_test_tools
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
began=$SECONDS
timeout 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/speed/test_nf4_cuda.py tests/speed/test_triton_route.py \
  2>&1 | tail -20 | tee -a "$log"
echo "[nf4_check] tests done after $((SECONDS - began)) s" | tee -a "$log"
for route in triton eager; do
  NECTAR_DECODE_ROUTE=$route timeout 180 python3 benchmarks/bench_gpu.py --model llama2-7b --quant nf4 --device cuda \
    --dtype float16 --nodes 1 --sessions 1 16 --no-local --no-one-node --repeats 2 --node-args "--batch-wait 0.5" \
    --json "$out/gpu_nf4_7b_$route.json" 2>&1 | grep --line-buffered -v -i warning | tee -a "$log"
  echo "[nf4_check] $route route done after $((SECONDS - began)) s" | tee -a "$log"
done
