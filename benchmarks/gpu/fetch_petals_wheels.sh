#!/usr/bin/env bash
# Downloads (here, with PyPI access) what the Petals 2.2.0.post1 comparison venv needs on the GPU machine (no internet)
# beyond its image and Nectar's .whl/ (benchmarks/gpu/fetch_wheels.sh), into .petalswhl/ at the repository root
# (ignored by git). benchmarks/petals/setup_venv.sh --offline .petalswhl installs from it.
#
#   bash benchmarks/gpu/fetch_petals_wheels.sh [--python-version 3.12] [DEST]
#
# - hivemind 1.1.10.post2: PyPI has only its source; we build its wheel here (protos compiled by grpcio-tools 1.66,
#   the protobuf 5.27 gencode hivemind 1.1.12's wheel ships, which runs on the image's newer protobuf) with an EMPTY
#   p2pd placeholder: setup_venv.sh copies the real p2pd from the hivemind 1.1.12 installed from Nectar's .whl/
#   (saves 9 MB here; the CPU route does the same from the 1.1.12 wheel).
# - petals itself is installed with --no-deps: its pin bitsandbytes==0.41.1 is left out on purpose, since Petals
#   imports bitsandbytes only for quantization and LoRA adapters, and the benchmark runs servers with
#   `--quant_type none` (float16) and no adapters. cpufeature (a Petals requirement on x86) is left out too: PyPI has
#   no wheel of it for Python 3.12, and Petals imports it only to decide whether to chunk a float16/bfloat16 LM head
#   on the CPU, which run_petals.py's client, whose head is float32 or on the GPU, answers itself.
# - torch, numpy, scipy, safetensors, msgpack, uvloop, protobuf, ... come from the image (the venv sees them through
#   --system-site-packages); numpy 2 works with this stack (checked on CPU), so numpy<2 is not carried.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
pyver=3.12
if [[ "${1:-}" == "--python-version" ]]; then
  pyver="$2"
  shift 2
fi
dest="${1:-.petalswhl}"
abi="cp${pyver/./}"
mkdir -p "$dest"
platform=(--python-version "$pyver" --implementation cp --abi "$abi" --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64
          --platform manylinux_2_5_x86_64 --platform any)
binary=(
  petals==2.2.0.post1 transformers==4.34.1 tokenizers==0.14.1 huggingface-hub==0.17.3 accelerate==0.24.1
  peft==0.5.0 tensor-parallel==1.0.23 Dijkstar==2.6.0 speedtest-cli==2.1.3 humanfriendly==10.0
  multiaddr==0.0.9 pymultihash==0.8.2 async-timeout==4.0.3
)
for spec in "${binary[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d "$dest" "$spec"
done
# pydantic 1's pure-Python wheel (its compiled ones only speed up validation, which the benchmark barely uses)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --platform any -d "$dest" \
  "pydantic>=1.10,<2"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "[petals wheels] building hivemind 1.1.10.post2 (p2pd placeholder)"
python3 -m venv "$work/build"
"$work/build/bin/python" -m pip install -q "setuptools<70" wheel "grpcio-tools==1.66.2"
"$work/build/bin/python" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
  hivemind==1.1.10.post2 -d "$work"
tar -xzf "$work"/hivemind-1.1.10.post2.tar.gz -C "$work"
src="$work/hivemind-1.1.10.post2"
: >"$src/hivemind/hivemind_cli/p2pd"
empty=$(sha256sum "$src/hivemind/hivemind_cli/p2pd" | cut -d' ' -f1)
sed -i -E "s/\"p2pd-linux-amd64\": \"[0-9a-f]+\"/\"p2pd-linux-amd64\": \"$empty\"/" "$src/setup.py"
"$work/build/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$dest" "$src"

ls "$dest"
echo "[petals wheels] $(du -sm "$dest" | cut -f1) MiB in $dest"
if [[ -d .whl ]]; then  # both travel to the GPU machine with the tracked tree: 64 MiB in all per device call
  echo "[petals wheels] with Nectar's .whl/: $(du -scm .whl "$dest" | tail -1 | cut -f1) MiB (the tree adds ~5 MiB)"
fi
