#!/usr/bin/env bash
# The GPU run (one NVIDIA GPU, no internet), from the repository root:
#   here:  bash benchmarks/gpu/fetch_wheels.sh          # once: .whl/ with the packages the GPU image lacks
#   there: bash benchmarks/gpu/run_gpu.sh [OUT_DIR [BENCH_ARGS...]]   # through the device tool, carrying .whl
# Prints every figure; also writes OUT_DIR/gpu.json and OUT_DIR/gpu.log.
set -euo pipefail
out="${1:-${OUT:-/tmp/nectar-gpu}}"
shift || true  # the rest goes to bench_gpu.py (e.g. --node-args "--batch-wait 0.5")
mkdir -p "$out"
python3 -m pip install -q --no-index --find-links .whl hivemind==1.1.12 eth-account==0.14.0 coincurve==21.0.0 \
  pycryptodome==3.24.1 eth-utils==6.0.0 2>&1 | grep -v "^WARNING: Running pip as" || true
chmod +x "$(python3 -c 'import hivemind, os; print(os.path.dirname(hivemind.__file__))')/hivemind_cli/p2pd"

# Nectar's import root (setup.py maps top-level folders onto `nectar`), without a build step
root=/tmp/nectar-root/nectar
rm -rf /tmp/nectar-root && mkdir -p "$root"
for f in core/*; do ln -s "$PWD/$f" "$root/$(basename "$f")"; done
for pkg in wire models node client ledger chain api; do ln -s "$PWD/$pkg" "$root/$pkg"; done
export PYTHONPATH=/tmp/nectar-root${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NECTAR_BENCH_DIR="${NECTAR_BENCH_DIR:-/root/.cache/nectar-bench}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.log"
python3 -c "import torch, transformers, hivemind; print('torch', torch.__version__, 'transformers', transformers.__version__, 'hivemind', hivemind.__version__)" | tee -a "$out/gpu.log"
python3 benchmarks/bench_gpu.py --model llama2-7b --device cuda --dtype float16 --repeats 5 --sessions 1 16 \
  --json "$out/gpu.json" "$@" 2>&1 | grep -v -i "warning" | tee -a "$out/gpu.log"
