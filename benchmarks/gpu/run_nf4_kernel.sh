#!/usr/bin/env bash
# The nf4 Triton kernel (models/nf4_triton.py) on a GPU, from the repository root:
#   here:  bash benchmarks/gpu/fetch_wheels.sh && bash benchmarks/gpu/fetch_wheels.sh --bnb   # .whl/ and .bnb/
#   there: bash benchmarks/gpu/run_nf4_kernel.sh OUT_DIR   # through the device tool, carrying .whl and .bnb
# In order of what matters if the call is cut short: its CUDA tests (and the nf4 node tests with the kernel on),
# its products against bitsandbytes' per matrix of a 7B and a 70B block (tile sizes swept), then the Llama-2-7B-shaped
# nf4 checkpoint on one node, 1 and 16 sessions, with the kernel and with bitsandbytes' products, alternating.
# Writes OUT_DIR/nf4_kernel.log, nf4_kernel.json and gpu_nf4_7b_<kernel>.json. QUICK=1 sweeps fewer tiles; KERNELS
# names the node runs (default "triton bitsandbytes"; none: no node runs).
set -uo pipefail
out="${1:-${OUT:-/tmp/nectar-gpu}}"
mkdir -p "$out"
log="$out/nf4_kernel.log"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_bitsandbytes
install_test_tools
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
began=$SECONDS
timeout 120 python3 -m pytest -q -p no:cacheprovider -rfEs tests/speed/test_nf4_kernel.py 2>&1 | tail -8 | tee -a "$log"
if [[ -z "${QUICK:-}" ]]; then  # the nf4 node tests with the kernel on
  NECTAR_NF4_KERNEL=triton timeout 120 python3 -m pytest -q -p no:cacheprovider -rfEs tests/speed/test_nf4_cuda.py \
    -k "recorded_rounds" 2>&1 | tail -8 | tee -a "$log"
fi
echo "[nf4_kernel] tests done after $((SECONDS - began)) s" | tee -a "$log"
timeout "${SWEEP_TIMEOUT:-240}" python3 benchmarks/quant/bench_nf4_kernel.py ${QUICK:+--quick} --json "$out/nf4_kernel.json" 2>&1 \
  | grep --line-buffered -v -i warning | tee -a "$log"
echo "[nf4_kernel] sweep done after $((SECONDS - began)) s" | tee -a "$log"
[[ "${KERNELS:-}" == none ]] && exit 0  # the kernel's tests and sweep only
# the node runs with the tiles the sweep found fastest here
tiles=$(python3 -c "import json; print(json.dumps(json.load(open('$out/nf4_kernel.json'))['tiles']))" 2>/dev/null || true)
[[ -n "$tiles" ]] && export NECTAR_NF4_TILES="$tiles" && echo "[nf4_kernel] NECTAR_NF4_TILES=$tiles" | tee -a "$log"
for kernel in ${KERNELS:-triton bitsandbytes}; do
  NECTAR_NF4_KERNEL=$kernel timeout ${NODE_TIMEOUT:-150} python3 benchmarks/bench_gpu.py --model llama2-7b --quant nf4 --device cuda \
    --dtype float16 --nodes 1 --sessions 1 16 --no-local --no-one-node --repeats 2 --node-args "--batch-wait 0.5" \
    --json "$out/gpu_nf4_7b_$kernel.json" 2>&1 | grep --line-buffered -v -i warning | tee -a "$log"
  echo "[nf4_kernel] $kernel done after $((SECONDS - began)) s" | tee -a "$log"
done
