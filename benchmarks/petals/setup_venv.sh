#!/usr/bin/env bash
# A separate virtual environment with Petals 2.2.0.post1, for the comparison benchmarks only (never a dependency
# of Nectar). Idempotent. Usage: benchmarks/petals/setup_venv.sh [--offline DIR] [VENV_DIR]
#   (default VENV_DIR ~/.cache/nectar-bench/petals-venv; PETALS_WHEELS=DIR does what --offline DIR does)
#
# --offline DIR (the GPU machine, no internet): no downloads; every package from DIR (made by
# benchmarks/gpu/fetch_petals_wheels.sh), torch and the rest from the machine (any torch version, e.g. 2.11 CUDA),
# hivemind's p2pd from the machine's hivemind 1.1.12 (installed from Nectar's .whl/). See that script for what is
# left out and why (bitsandbytes: run servers with --quant_type none).
#
# What Petals 2.2.0.post1 needs on this stack, and why:
# - transformers < 4.35 (4.34.1), accelerate 0.24.1, pydantic 1, numpy < 2 (and scipy built for it);
# - hivemind 1.1.10.post2: PyPI has only its source, whose build downloads `p2pd` from GitHub. The build skips the
#   download when hivemind/hivemind_cli/p2pd already has the expected checksum, so we put there the p2pd binary of
#   PyPI's hivemind 1.1.12 wheel and record its checksum in setup.py;
# - multiaddr 0.0.9 (newer versions break hivemind 1.1.10's streams);
# - torch: the machine's torch 2.13.0 (CPU), reused through --system-site-packages; run_petals.py patches the two
#   names hivemind 1.1.10 imports from torch.cuda.amp.grad_scaler, which torch 2.13 moved to torch.amp.grad_scaler.
set -euo pipefail

offline="${PETALS_WHEELS:-}"
if [[ "${1:-}" == "--offline" ]]; then
  offline="$2"
  shift 2
fi
venv="${1:-${PETALS_VENV:-$HOME/.cache/nectar-bench/petals-venv}}"
marker="$venv/.petals-2.2.0.post1-ready"
if [[ -f "$marker" ]]; then
  echo "[petals] $venv is ready"
  exit 0
fi

python_bin="${PYTHON:-python3}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -n "$offline" ]]; then
  offline="$(cd "$offline" && pwd)"
  # p2pd: the machine's hivemind 1.1.12 (found without importing it), else a hivemind 1.1.12 wheel in DIR
  p2pd=$("$python_bin" -c "import importlib.util as u, os; s = u.find_spec('hivemind'); \
print(os.path.join(os.path.dirname(s.origin), 'hivemind_cli', 'p2pd') if s else '')")
  if [[ ! -s "$p2pd" ]]; then
    wheel=$(ls "$offline"/hivemind-1.1.12-*.whl 2>/dev/null | head -1 || true)
    if [[ -z "$wheel" ]]; then
      echo "[petals] no p2pd: install hivemind 1.1.12 (Nectar's .whl/) or put its wheel in $offline" >&2
      exit 1
    fi
    p2pd="$(mktemp -d)/p2pd"
    "$python_bin" -c "import sys, zipfile; open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read(\
'hivemind/hivemind_cli/p2pd'))" "$wheel" "$p2pd"
  fi
  echo "[petals] offline from $offline: creating $venv (the machine's torch \
$("$python_bin" -c "import torch; print(torch.__version__)"), p2pd from $p2pd)"
  "$python_bin" -m venv --system-site-packages "$venv"
  site_dir=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # Python < 3.12 seeds a venv with an old setuptools that would shadow the machine's (grpcio-tools wants >= 77)
  if [[ -d "$site_dir/setuptools" ]]; then
    "$venv/bin/python" -m pip uninstall -q -y setuptools
  fi
  # the GPU image's python3 is itself a venv (/opt/torch/.venv): --system-site-packages would show the base Python's
  # packages, not its torch; a .pth after the new venv's own site-packages shows them (the new venv's still win)
  "$python_bin" -c "import site, sys; print('\n'.join(site.getsitepackages()) if sys.prefix != sys.base_prefix else '')" \
    >"$site_dir/_machine_site.pth"
  pip=("$venv/bin/python" -m pip install -q --no-index --find-links "$offline" --no-build-isolation)
  # numpy, scipy, safetensors, protobuf, ... stay the machine's (numpy 2 works with this stack)
  "${pip[@]}" hivemind==1.1.10.post2 transformers==4.34.1 tokenizers==0.14.1 huggingface-hub==0.17.3 \
    accelerate==0.24.1 peft==0.5.0 tensor-parallel==1.0.23 Dijkstar==2.6.0 speedtest-cli==2.1.3 humanfriendly \
    "pydantic<2" multiaddr==0.0.9 pymultihash async-timeout
  "${pip[@]}" --no-deps petals==2.2.0.post1  # without bitsandbytes (see above)
  target=$("$venv/bin/python" -c "import importlib.util as u, os; \
print(os.path.join(os.path.dirname(u.find_spec('hivemind').origin), 'hivemind_cli', 'p2pd'))")
  install -m 755 "$p2pd" "$target"
  "$venv/bin/python" "$here/run_petals.py" check
  touch "$marker"
  echo "[petals] ready: $venv"
  exit 0
fi

torch_version=$("$python_bin" -c "import torch; print(torch.__version__.split('+')[0])")
if [[ "$torch_version" != "2.13.0" ]]; then
  echo "[petals] expected the machine's torch 2.13.0, found $torch_version: install torch==2.13.0 first" >&2
  exit 1
fi

echo "[petals] creating $venv (reusing the machine's torch $torch_version)"
"$python_bin" -m venv --system-site-packages "$venv"
pip=("$venv/bin/python" -m pip)
constraints="$venv/constraints.txt"
cat >"$constraints" <<'PINS'
torch==2.13.0
transformers==4.34.1
accelerate==0.24.1
pydantic<2
multiaddr==0.0.9
numpy<2
scipy<1.14
protobuf>=3.20,<5
grpcio-tools<1.63
huggingface-hub<0.18
tokenizers<0.15
PINS

"${pip[@]}" install -q -c "$constraints" "setuptools<70" wheel "grpcio-tools" "protobuf"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "[petals] building hivemind 1.1.10.post2 with the p2pd binary of hivemind 1.1.12"
"${pip[@]}" download -q --no-deps --no-binary :all: --no-build-isolation hivemind==1.1.10.post2 -d "$work"
"${pip[@]}" download -q --no-deps --only-binary :all: hivemind==1.1.12 -d "$work"
tar -xzf "$work"/hivemind-1.1.10.post2.tar.gz -C "$work"
src="$work/hivemind-1.1.10.post2"
"$venv/bin/python" - "$work" "$src" <<'PY'
import glob, hashlib, os, re, sys, zipfile
work, src = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(work, "hivemind-1.1.12-*.whl"))[0]
target = os.path.join(src, "hivemind", "hivemind_cli", "p2pd")
with zipfile.ZipFile(wheel) as archive, open(target, "wb") as out:
    out.write(archive.read("hivemind/hivemind_cli/p2pd"))
os.chmod(target, 0o755)
digest = hashlib.sha256(open(target, "rb").read()).hexdigest()
setup_path = os.path.join(src, "setup.py")
setup = open(setup_path).read()
setup = re.sub(r'"p2pd-linux-amd64": "[0-9a-f]+"', f'"p2pd-linux-amd64": "{digest}"', setup)
open(setup_path, "w").write(setup)
print(f"[petals] p2pd {digest[:12]}... in place")
PY
"${pip[@]}" install -q -c "$constraints" --no-build-isolation "$src"

echo "[petals] installing petals 2.2.0.post1 and its pins"
"${pip[@]}" install -q -c "$constraints" petals==2.2.0.post1 transformers==4.34.1 accelerate==0.24.1 \
  "pydantic<2" multiaddr==0.0.9 "numpy<2" "scipy<1.14"

"$venv/bin/python" "$here/run_petals.py" check
touch "$marker"
echo "[petals] ready: $venv"
