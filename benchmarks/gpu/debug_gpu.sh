#!/usr/bin/env bash
# Diagnostics for the GPU run: per-stage latency of one hop on the GPU node, and a py-spy profile of that node.
# Same set-up as run_gpu.sh (wheels in .whl; py-spy there with fetch_wheels.sh --spy).
# Usage: bash benchmarks/gpu/debug_gpu.sh OUT
set -euo pipefail
out="${1:-${OUT:-/tmp/nectar-gpu}}"
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python3 -m pip install -q --no-index --find-links .whl py-spy 2>/dev/null || true
python3 benchmarks/profile_hop.py --model llama2-7b --device cuda --dtype float16 --threads 4 --steps "${STEPS:-300}" \
  --spy "$out/node_spy.txt" 2>&1 | grep -v -i "warning" | tee "$out/hop.log"
