#!/usr/bin/env bash
# nectar.api: Debian's Chromium (the monitor page's screenshot test drives it through Python playwright, which never
# downloads its own browsers here), and the Python packages playwright, openai, python-multipart (FastAPI's file
# uploads for /v1/files) and pillow (the screenshot test reads pixels). PostgreSQL and Redis come from 30-ledger.sh.
# Idempotent; works as root on a fresh Debian machine.
set -euo pipefail

constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"  # never let a dependency pull in another torch

if ! command -v chromium >/dev/null 2>&1; then
  echo "[40-api] installing chromium (Debian package)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi

if ! python -c "import playwright, openai, multipart, PIL" 2>/dev/null; then
  echo "[40-api] installing playwright, openai, python-multipart, pillow"
  # no `playwright install`: tests launch /usr/bin/chromium through executable_path
  pip install -q -c "$constraints" "playwright>=1.45" "openai>=1.40" "python-multipart>=0.0.9" "pillow>=10"
fi
echo "[40-api] chromium $(chromium --version 2>/dev/null | awk '{print $2}') and playwright ready"
