#!/usr/bin/env bash
# Installs Nectar and everything its commands and tests need, on a fresh Debian machine (as root) or a developer's.
# Idempotent: a second run only checks. Each part lives in scripts/setup.d/NN-name.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"  # the local CPU wheel; never let a dependency pull a CUDA build

if ! python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU)"
  pip install -q "torch==2.13.0"
fi
# locust is looked up, not imported: importing it patches the interpreter with gevent
if ! python -c "import importlib.util as u, nectar.node, nectar.client, pytest, threadpoolctl, bitsandbytes, llguidance, lm_eval, fastapi_offline, schemathesis, triton; assert u.find_spec('locust'); import shutil; assert shutil.which('py-spy')" 2>/dev/null || [[ "${NECTAR_REINSTALL:-0}" == 1 ]]; then
  echo "[setup] installing nectar-swarm (editable) with test extras"
  pip install -q -c "$constraints" -e ".[test]"
fi
for part in scripts/setup.d/*.sh; do
  bash "$part"
done
echo "[setup] done"
