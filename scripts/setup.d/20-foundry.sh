#!/usr/bin/env bash
# Contracts toolchain: Anvil, Forge and Cast (npm @foundry-rs/*), solcjs for forge's `solc` shim, OpenZeppelin, all
# pinned by package-lock.json; then a first `forge build` so the devnet and tests deploy from contracts/out.
# Idempotent; works as root on a fresh Debian machine. Nothing is downloaded at run time after this.
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "[20-foundry] installing nodejs and npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq nodejs npm >/dev/null
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if ((node_major < 18)); then
  echo "[20-foundry] node $(node --version) is too old: solcjs and the Foundry wrappers need node >= 18" >&2
  exit 1
fi

# `npm ci` wipes node_modules; skip it when the installed tree already matches the lock file.
stamp=node_modules/.nectar-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ ! -x node_modules/.bin/forge || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[20-foundry] npm ci (anvil, forge, cast, solc, @openzeppelin/contracts)"
  # Install scripts are not needed: each tool's Linux binary arrives as an optional dependency.
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  echo "$want" >"$stamp"
fi

for tool in anvil forge cast; do
  "node_modules/.bin/$tool" --version >/dev/null || { echo "[20-foundry] $tool does not run" >&2; exit 1; }
done
chmod +x contracts/tools/solc
contracts/tools/solc --version | grep -q "Version: 0.8" || { echo "[20-foundry] the solc shim does not run" >&2; exit 1; }

echo "[20-foundry] forge build"
node_modules/.bin/forge build --quiet
echo "[20-foundry] anvil $(node_modules/.bin/anvil --version | head -1 | awk '{print $3}'), contracts built"
