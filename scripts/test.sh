#!/usr/bin/env bash
# Runs every test (Python and Solidity): set-up first, then one pytest run over tests/ (tests/chain runs forge test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec python -m pytest tests -q -ra --durations=25 "$@"
