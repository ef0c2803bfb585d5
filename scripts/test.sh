#!/usr/bin/env bash
# Runs every check and test: set-up first, then the format, lint and import-layering checks (seconds), then one
# pytest run over tests/ (Python and Solidity: tests/chain runs forge test).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

# Each check fails the run before the long tests start, and says which command fixes or shows what it found.
check() {
  local hint=$1
  shift
  echo "[test] $*"
  if ! "$@"; then
    echo "[test] FAILED: $*" >&2
    echo "[test] $hint" >&2
    exit 1
  fi
}
check "Run 'ruff format .' to fix ('ruff format --diff .' shows the changes)." \
  ruff format --check --output-format concise .
check "Run 'ruff check --fix .', then fix the rest by hand ('ruff rule CODE' explains a rule)." \
  ruff check .
check "Run 'python scripts/check_layers.py' to see them; its docstring lists which package may import which." \
  python scripts/check_layers.py

exec python -m pytest tests -q -ra --durations=25 "$@"
