#!/usr/bin/env bash
# The 70B run (issue 25, point 5), one GPU of 80 GB, 64 GiB disk, no internet, from the repository root:
#   here:  bash benchmarks/gpu/fetch_wheels.sh && bash benchmarks/gpu/fetch_wheels.sh --bnb   # .whl/ and .bnb/
#   there: carrying .whl and .bnb (44 MiB: --bnb repacks bitsandbytes with only the CUDA 13.0 and CPU libraries),
#          `run_70b.sh build OUT`, then on the same warm machine `run_70b.sh bench OUT` (the checkpoint stays there)
# build: a random Llama-2-70B-shaped nf4 checkpoint (~37 GB, drawn and quantized on the GPU tensor by tensor; the
# 138 GB float16 checkpoint is never written) into $NECTAR_BENCH_DIR, reused by later calls on the same machine.
# bench: 2 nodes of 40 blocks on that GPU (--quant nf4), single-session decode and 16 concurrent sessions, and the
# weights' bandwidth floor (nf4 bytes per step over the measured copy bandwidth) with the share each figure reaches.
# Steps fit the device tool's 10-minute calls separately; "all" (the default) runs both (about 7 minutes on an H100).
# Writes OUT_DIR/gpu_70b.log and OUT_DIR/gpu_70b_nodes<N>.json.
set -euo pipefail
step="${1:-all}"
shift || true
out="${1:-${OUT:-/tmp/nectar-gpu}}"
shift || true
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_bitsandbytes
log="$out/gpu_70b.log"

if [[ "$step" == build || "$step" == all ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
  mkdir -p "$NECTAR_BENCH_DIR" && df -h "$NECTAR_BENCH_DIR" | tail -1 | tee -a "$log"
  install_test_tools
  # the builder's GPU codes read alike by a CUDA node, a CPU verifier and transformers (a tiny shape, seconds)
  python3 -m pytest -q -p no:cacheprovider tests/speed/test_nf4_cuda.py 2>&1 | tail -3 | tee -a "$log" || true
  python3 benchmarks/prequantized.py --model llama2-70b --device cuda 2>&1 | tee -a "$log"
fi
if [[ "$step" == bench || "$step" == all ]]; then
  # 2 x 40 blocks of ~18 GB nf4 each, 4 GB of cache each: room on 80 GB for the client's float16 head too (NODES=1:
  # one node of 80 blocks). The nodes gather each round's sessions (--batch-wait): an nf4 round of 16 rows costs
  # nearly what one row does, so rounds that split cost a weight read each (stop 40: 42.5 tok/s without, 2 nodes)
  python3 benchmarks/bench_gpu.py --model llama2-70b --quant nf4 --device cuda --dtype float16 --no-local \
    --no-one-node --nodes "${NODES:-2}" --repeats 3 --sessions 1 16 --cache-mb 4096 --push \
    --node-args "${NODE_ARGS:---batch-wait 0.5}" --json "$out/gpu_70b_nodes${NODES:-2}.json" "$@" 2>&1 \
    | grep --line-buffered -v -i "warning" | tee -a "$log"
fi
