#!/usr/bin/env bash
# Diagnostics for the GPU run: per-stage latency of one hop on the GPU node, and a py-spy profile of that node.
# Same set-up as run_gpu.sh (wheels in .whl, py-spy included when present). Usage: bash benchmarks/gpu/debug_gpu.sh OUT
set -euo pipefail
out="${1:-${OUT:-/tmp/nectar-gpu}}"
mkdir -p "$out"
python3 -m pip install -q --no-index --find-links .whl hivemind==1.1.12 eth-account==0.14.0 coincurve==21.0.0 \
  pycryptodome==3.24.1 eth-utils==6.0.0 2>&1 | grep -v "^WARNING: Running pip as" || true
python3 -m pip install -q --no-index --find-links .whl py-spy 2>/dev/null || true
chmod +x "$(python3 -c 'import hivemind, os; print(os.path.dirname(hivemind.__file__))')/hivemind_cli/p2pd"
root=/tmp/nectar-root/nectar
rm -rf /tmp/nectar-root && mkdir -p "$root"
for f in core/*; do ln -s "$PWD/$f" "$root/$(basename "$f")"; done
for pkg in wire models node client ledger chain api; do ln -s "$PWD/$pkg" "$root/$pkg"; done
export PYTHONPATH=/tmp/nectar-root${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 benchmarks/profile_hop.py --model llama2-7b --device cuda --dtype float16 --threads 4 --steps "${STEPS:-300}" \
  --spy "$out/node_spy.txt" 2>&1 | grep -v -i "warning" | tee "$out/hop.log"
