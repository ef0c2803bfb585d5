#!/usr/bin/env bash
# Every CPU figure of benchmarks/RESULTS.md, in one go (about an hour on 2 cores). JSON lands in benchmarks/results/.
# Threads: 1 for "tiny" (its products are memory-bound; a second OpenMP thread only adds wake-ups), 2 for "mid".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
mkdir -p results
run() { echo "+ python $*" >&2; python "$@"; }
run bench_decode.py --model tiny --threads 1 --nodes 1 2 3 --repeats 3 --json results/decode_tiny.json
run bench_decode.py --model mid --threads 2 --nodes 1 2 3 --repeats 2 --json results/decode_mid.json
run profile_hop.py --model tiny --threads 1 --steps 300
run bench_concurrency.py --model tiny --threads 1 --repeats 2 --json results/concurrency_tiny.json
run bench_concurrency.py --model mid --threads 2 --repeats 1 --json results/concurrency_mid.json
run bench_training.py --model tiny --threads 1 --nodes 2 --repeats 2 --json results/training_tiny.json
run bench_training.py --model mid --threads 2 --nodes 2 --repeats 2 --json results/training_mid.json
run bench_petals.py --model tiny --threads 1 --repeats 3 --json results/petals_tiny.json
run bench_petals.py --model mid --threads 2 --repeats 2 --json results/petals_mid.json
