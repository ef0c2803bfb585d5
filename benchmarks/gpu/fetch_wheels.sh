#!/usr/bin/env bash
# Downloads (here, with PyPI access) the wheels Nectar's node and client need on a CUDA PyTorch machine that has no
# internet, into .whl/ at the repository root (ignored by git). The GPU image already has torch, transformers,
# numpy, scipy, msgpack, uvloop, protobuf, PyYAML, ...; these are the rest (Python 3.12, x86-64 manylinux).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
dest=.whl
mkdir -p "$dest"
platform=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 --platform any)
binary=(
  hivemind==1.1.12 grpcio==1.85.3 grpcio-tools==1.85.1 cryptography==48.0.0 cffi==2.0.0 pycparser==3.0
  configargparse==1.9.0 base58==2.1.1 netaddr==1.3.0 mmh3==5.3.1 morphys==1.0 py-cid==0.5.0
  py-multibase==2.0.0 py-multicodec==1.0.0 py-multihash==3.0.0 blake3==1.0.11
  eth-account==0.14.0 eth-abi==6.0.0 eth-hash==0.8.0 eth-keyfile==0.10.0 eth-keys==0.8.0 eth-rlp==3.0.0
  eth-typing==6.0.0 eth-utils==6.0.0 hexbytes==2.0.0 rlp==5.0.0 bitarray==3.12.3 ckzg==2.1.8 cytoolz==1.2.0
  parsimonious==0.10.0 py-ecc==8.0.0 coincurve==21.0.0 pycryptodome==3.24.1 safe-pysha3==1.0.7
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  threadpoolctl==3.8.0
  pytest==8.4.2 pluggy==1.6.0 iniconfig==2.1.0 pytest-timeout==2.4.0  # the CUDA tests
)
# py-spy (2.9 MB) only with --spy (spy_node.sh, debug_gpu.sh): without it .whl + .bnb + .petalswhl + the tree fit the
# device tool's 64 MiB for run_petals_gpu.sh with 3 MiB to spare (with it, 63.9 MiB at stop 40)
if [[ " $* " == *" --spy "* ]]; then binary+=(py-spy==0.4.3); fi
for spec in "${binary[@]}"; do
  python -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d "$dest" "$spec"
done
# pure-Python packages PyPI has only as source: build their (universal) wheels here
for spec in prefetch-generator==1.0.3 varint==1.0.2 python-baseconv==1.2.2; do
  python -m pip wheel -q --no-deps -w "$dest" "$spec"
done
# --bnb: bitsandbytes (quantized weights: the 70B run; Petals imports it too) into .bnb/, repacked with only the
# CUDA 13.0 and CPU libraries the GPU image's torch loads (43 MB -> 3.4 MB), so .whl + .bnb + .petalswhl fit one call
if [[ " $* " == *" --bnb "* ]]; then
  mkdir -p .bnb
  python -m pip download -q --no-deps --only-binary=:all: "${platform[@]}" --platform manylinux_2_24_x86_64 \
    -d .bnb bitsandbytes==0.50.2
  python benchmarks/gpu/slim_wheel.py .bnb/bitsandbytes-0.50.2-*.whl '*_cuda130.so' '*_cpu.so'
  du -sh .bnb
fi
# --api: the gateway's dependencies and locust, for run_api_load.sh (pip resolves their dependencies for 3.12), into
# .apiwhl/ (27 MiB): with .whl (38 MiB) they exceed the device tool's 64 MiB, so that call follows one that carried .whl
if [[ " $* " == *" --api "* ]]; then
  mkdir -p .apiwhl
  python -m pip download -q --only-binary=:all: "${platform[@]}" -d .apiwhl locust fastapi fastapi-offline uvicorn sqlalchemy \
    alembic "celery[redis]" pydantic-settings httpx python-multipart aiosqlite psycopg2-binary redis py-spy
  for f in .apiwhl/*.whl; do if [[ -e "$dest/$(basename "$f")" ]]; then rm "$f"; fi; done  # .whl has these
  du -sh .apiwhl
fi
du -sh "$dest"
