#!/usr/bin/env bash
# The linters scripts/test.sh runs before pytest: ruff at the version pinned in pyproject.toml's test extras (one pin,
# so a developer's format check agrees with CI's). Idempotent: skipped when that version is installed.
set -euo pipefail
cd "$(dirname "$0")/../.."

pin=$(python - <<'PY'
import tomllib

extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["test"]
print(next(requirement for requirement in extras if requirement.startswith("ruff==")))
PY
)
if [[ "$(ruff --version 2>/dev/null)" != "ruff ${pin#ruff==}" ]]; then
  echo "[50-lint] installing $pin"
  pip install -q "$pin"
fi
echo "[50-lint] $(ruff --version) ready"
