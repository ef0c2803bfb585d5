#!/usr/bin/env bash
# The GPU run of bench_quant.py (issue 23, item 3), for the device machine (no network there): carry the
# bitsandbytes wheel in .whl/ (here: pip download bitsandbytes==0.50.2 --no-deps -d .whl; 43 MB, py3-none).
# Writes $OUT/quant_gpu_*.json (or benchmarks/results/quant/ when $OUT is unset).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-benchmarks/results/quant}
if ! python -c "import bitsandbytes" 2>/dev/null; then
  pip install -q --no-index --no-deps .whl/bitsandbytes-*.whl
fi
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[-1].lower().replace(' ', '-'))" 2>/dev/null || echo gpu)
# the 7B shape: 4 random blocks of Llama-2-7B's shape, float16 (memory per block and decode tok/s)
python benchmarks/quant/bench_quant.py --device cuda --dtype float16 --shape llama2-7b --blocks 4 --tokens 64 \
  --repeats 5 --out "$out/quant_gpu_${gpu}_llama2-7b.json"
# the built-in model on the GPU, float16 (perplexity too) when its converted checkpoint is there
if python -c "from nectar.models.builtin import is_converted; raise SystemExit(not is_converted('smollm2-135m'))"; then
  python benchmarks/quant/bench_quant.py --device cuda --dtype float16 --tokens 64 --repeats 5 \
    --out "$out/quant_gpu_${gpu}_smollm2-135m.json"
fi
