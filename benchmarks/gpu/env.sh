# Sourced by the GPU scripts (repository root as the working directory): installs the wheels of .whl/ that the
# CUDA image lacks and makes `nectar` importable from the working tree, without a build step.
python3 -m pip install -q --no-index --find-links .whl hivemind==1.1.12 eth-account==0.14.0 coincurve==21.0.0 \
  pycryptodome==3.24.1 safe-pysha3==1.0.7 eth-utils==6.0.0 threadpoolctl==3.8.0 2>&1 | grep -v "^WARNING: Running pip as" || true
# bitsandbytes (quantized weights) when the image lacks it and a call carried .bnb/ (fetch_wheels.sh --bnb)
if [[ -d .bnb ]] && ! python3 -c "import bitsandbytes" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --find-links .bnb bitsandbytes==0.50.2 2>&1 \
    | grep -v "^WARNING: Running pip as" || true
fi
chmod +x "$(python3 -c 'import hivemind, os; print(os.path.dirname(hivemind.__file__))')/hivemind_cli/p2pd"

# for the scripts that need them: bitsandbytes (nf4 runs stop without it), pytest (the CUDA tests)
require_bitsandbytes() {
  python3 -c "import bitsandbytes" || { echo "bitsandbytes is missing: carry .bnb/ (fetch_wheels.sh --bnb)" >&2; exit 1; }
}
install_test_tools() {
  python3 -m pip install -q --no-index --find-links .whl pytest pytest-timeout 2>&1 | grep -v "^WARNING" || true
}

# Nectar's import root (setup.py maps top-level folders onto `nectar`)
root=/tmp/nectar-root/nectar
rm -rf /tmp/nectar-root && mkdir -p "$root"
for f in core/*; do ln -s "$PWD/$f" "$root/$(basename "$f")"; done
for pkg in wire models node client ledger chain api service; do ln -s "$PWD/$pkg" "$root/$pkg"; done
export PYTHONPATH=/tmp/nectar-root${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NECTAR_BENCH_DIR="${NECTAR_BENCH_DIR:-/root/.cache/nectar-bench}"
