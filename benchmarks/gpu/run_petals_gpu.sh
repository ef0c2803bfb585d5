#!/usr/bin/env bash
# Nectar vs Petals 2.2.0.post1 on one NVIDIA GPU (no internet): Llama-2-7B-shaped random float16 checkpoint,
# 1- and 2-server swarms of each, single-session decode and 1/16 concurrent sessions, runs alternating.
#   here:  bash benchmarks/gpu/fetch_wheels.sh --bnb && bash benchmarks/gpu/fetch_petals_wheels.sh
#   there: bash benchmarks/gpu/run_petals_gpu.sh OUT_DIR [NODES...]   # carry .whl, .bnb, .petalswhl; NODES "1 2"
# .whl (38 MiB) + .bnb (3.4 MiB) + .petalswhl (13 MiB) + the tree (8 MiB) fit the device tool's 64 MiB (not with
# fetch_wheels.sh --api or --spy).
# Both swarm sizes in one call are estimated at 8-9 minutes on an H100 (not yet run there): to be safe, use two
# back-to-back calls (the warm machine keeps the venv and the checkpoint), NODES 2, then 1.
# Writes OUT_DIR/petals_gpu_nodes<N>.json and OUT_DIR/petals_gpu.log. REPEATS / SESSION_REPEATS (3 / 2) shorten a run.
set -euo pipefail
out="${1:-${OUT:-/tmp/nectar-petals-gpu}}"
shift || true
nodes=("$@")
[[ ${#nodes[@]} -gt 0 ]] || nodes=(1 2)
mkdir -p "$out"
log="$out/petals_gpu.log"
began=$SECONDS
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"  # Nectar's wheels (hivemind 1.1.12 gives Petals its p2pd too)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
venv="$NECTAR_BENCH_DIR/petals-venv"
# pip's notes on the image's packages that want pydantic 2 / newer transformers are expected (the venv shadows them)
bash benchmarks/petals/setup_venv.sh --offline .petalswhl "$venv" 2>&1 \
  | grep --line-buffered -v -e "incompatible" -e "^WARNING" -e "dependency conflicts" -e "FutureWarning" \
    -e "_register_pytree_node" | tee -a "$log"
echo "[run_petals_gpu] venv ready after $((SECONDS - began)) s" | tee -a "$log"
# threads: as bench_gpu.py; 64 new tokens per decode and per session (the Nectar GPU run's shapes)
python3 benchmarks/bench_petals.py --model llama2-7b --device cuda --dtype float16 --threads 4 \
  --nodes "${nodes[@]}" --sessions 1 16 --repeats "${REPEATS:-3}" --session-repeats "${SESSION_REPEATS:-2}" --no-tuning --no-local --venv "$venv" \
  --json "$out/petals_gpu_nodes$(IFS=-; echo "${nodes[*]}").json" 2>&1 \
  | grep --line-buffered -v -i "warning" | tee -a "$log"
echo "[run_petals_gpu] done in $((SECONDS - began)) s" | tee -a "$log"
