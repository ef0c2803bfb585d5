#!/usr/bin/env bash
# Every CPU figure of benchmarks/RESULTS.md, in one go (about an hour on 2 cores). A bare --json name lands in the
# script's own folder, benchmarks/results/<benchmark>/.
# Threads: 1 for "tiny" (its products are memory-bound; a second OpenMP thread only adds wake-ups), 2 for "mid".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
run() { echo "+ python $*" >&2; python "$@"; }
run bench_decode.py --model tiny --threads 1 --nodes 1 2 3 --repeats 3 --json decode_tiny.json
run bench_decode.py --model mid --threads 2 --nodes 1 2 3 --repeats 2 --json decode_mid.json
run profile_hop.py --model tiny --threads 1 --steps 300
run bench_decode_rounds.py --model tiny --threads 1 --sessions 1 4 16 64 --repeats 3 --json decode_rounds_tiny.json
run bench_concurrency.py --model tiny --threads 1 --repeats 2 --json concurrency_tiny.json
run bench_concurrency.py --model mid --threads 2 --repeats 1 --json concurrency_mid.json
run bench_training.py --model tiny --threads 1 --nodes 2 --repeats 2 --json training_tiny.json
run bench_training.py --model mid --threads 2 --nodes 2 --repeats 2 --json training_mid.json
run bench_petals.py --model tiny --threads 1 --repeats 3 --json petals_tiny.json
run bench_petals.py --model mid --threads 2 --repeats 2 --json petals_mid.json
run attacks/bench_swarm_attacks.py --json after.json  # honest generation under each attack of issue 22 (~9 min)
run api/bench_api_load.py --model tiny --threads 1 --direct 16 --json api_load_tiny_cpu.json  # the gateway under 1-64 users vs 16 direct sessions (~5 min)
