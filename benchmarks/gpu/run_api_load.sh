#!/usr/bin/env bash
# The API gateway's load benchmark on the GPU (Llama-2-7B shape, random float16 weights; issue 24), from the
# repository root, through the device tool carrying .whl:
#   here:  bash benchmarks/gpu/fetch_wheels.sh --api     # once: the gateway's and locust's wheels into .apiwhl/
#   there: bash benchmarks/gpu/run_api_load.sh [OUT_DIR [BENCH_ARGS...]]
# .whl + .apiwhl (68 MiB) exceed the device tool's 64 MiB: carry .apiwhl in a call that follows, on the same warm
# machine, one that carried .whl (its wheels stay installed), or carry both where the limit allows.
# 1/4/16/64 locust users streaming through `nectar api` against 16 direct client sessions on the same swarm (two
# nodes on the one GPU). Writes OUT_DIR/api_load.json (with each side's CPU ms per token) and OUT_DIR/api_load.log.
# A profiling run: add `--py-spy OUT_DIR/py-spy --users 16` (the gateway's stacks per run; py-spy pauses it to sample).
set -euo pipefail
out="${1:-${OUT:-/tmp/nectar-gpu}}"
shift || true
mkdir -p "$out"
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python3 -m pip install -q --no-index --find-links .whl --find-links .apiwhl locust fastapi fastapi-offline uvicorn sqlalchemy alembic "celery[redis]" \
  pydantic-settings httpx python-multipart aiosqlite psycopg2-binary redis py-spy 2>&1 | grep -v "^WARNING" || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/api_load.log"
python3 benchmarks/api/bench_api_load.py --model llama2-7b --device cuda --dtype float16 --threads 4 \
  --users 1 4 16 64 --direct 16 --tokens 128 --requests 2 --node-args "--batch-wait 0.5" \
  --json "$out/api_load.json" "$@" 2>&1 | grep --line-buffered -v -i "warning" | tee -a "$out/api_load.log"
