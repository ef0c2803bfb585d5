#!/usr/bin/env bash
# Where a GPU node's threads spend their CPU while it serves 16 concurrent sessions: bench_gpu.py's one-node runs
# (several runs of 16 sessions) under py-spy, native frames included, so system calls and uvloop show up.
#   here:  bash benchmarks/gpu/fetch_wheels.sh --spy   # .whl/ with py-spy
#   there: bash benchmarks/gpu/spy_node.sh OUT_DIR [BENCH_ARGS...]   # through the device tool, carrying .whl
# Writes OUT_DIR/spy.log (the runs' figures), OUT_DIR/node.raw (py-spy's collapsed stacks) and OUT_DIR/node.txt
# (benchmarks/spy_summary.py's table per thread).
set -euo pipefail
out="${1:-${OUT:-/tmp/nectar-gpu}}"
shift || true
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python3 -m pip install -q --no-index --find-links .whl py-spy 2>&1 | grep -v "^WARNING" || true
command -v py-spy > /dev/null || { echo "py-spy is missing: bash benchmarks/gpu/fetch_wheels.sh --spy, then carry .whl" >&2; exit 1; }

python3 benchmarks/bench_gpu.py --model llama2-7b --device cuda --dtype float16 --one-node-only \
  --sessions 1 16 16 16 16 16 16 "$@" > "$out/spy.log" 2>&1 &
bench=$!
node=""
for _ in $(seq 1 300); do  # the node starts once the checkpoint is built
  node=$(pgrep -f "nectar.cli node" | head -1 || true)
  if [ -n "$node" ] && grep -q "1 sessions:" "$out/spy.log"; then break; fi
  sleep 1
done
record() {  # native frames where the machine allows unwinding them, Python frames only otherwise
  py-spy record --pid "$node" --threads --rate 500 --duration "${SPY_SECONDS:-60}" --format raw \
    --output "$out/node.raw" "$@" >> "$out/spy_record.log" 2>&1
}
record --native || record || true
wait "$bench" || true
grep -v -i warning "$out/spy.log" | tail -20
python3 benchmarks/spy_summary.py "$out/node.raw" > "$out/node.txt" && head -150 "$out/node.txt"
