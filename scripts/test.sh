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

# pytest's stderr is kept too: if a native fault kills it, the faulting thread's stack is printed last, where the tail
# of a long CI log keeps it (faulthandler lists every thread, and a log cut in the middle loses which one faulted).
stderr_log=$(mktemp -t nectar-pytest-stderr.XXXXXX)
status=0
python -m pytest tests -q -ra --durations=25 "$@" 2> >(tee "$stderr_log" >&2) || status=$?
wait || true # the tee of the process substitution has written everything
if ((status > 128)); then
  python scripts/fault_summary.py "$stderr_log" $((status - 128)) >&2 || true
fi
rm -f "$stderr_log"
exit "$status"
