"""Repacks a wheel without the native libraries a machine will not load, so it fits the device tool's 64 MiB carry.

bitsandbytes 0.50's wheel (43 MB) holds one CUDA library per toolkit (11.8 ... 13.2), ROCm and XPU builds; the GPU
image's torch is built for CUDA 13.0, so the CUDA 13.x and CPU libraries are all it loads (3 MB compressed). The
RECORD file is rewritten to list exactly what stays, so pip installs and uninstalls the result normally.

    python benchmarks/gpu/slim_wheel.py WHEEL KEEP_GLOB [KEEP_GLOB...]   # native libraries matching a glob stay
"""

import base64
import fnmatch
import hashlib
import os
import sys
import zipfile

NATIVE = (".so", ".dll", ".dylib")


def slim(path: str, keep: list[str]) -> tuple[int, int]:
    """Rewrites ``path`` in place; returns its sizes before and after."""
    before = os.path.getsize(path)
    tmp = path + ".slim"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        names = [n for n in src.namelist() if not n.endswith(NATIVE) or any(fnmatch.fnmatch(n, g) for g in keep)]
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        lines = []
        for name in names:
            if name == record:
                continue
            data = src.read(name)
            dst.writestr(src.getinfo(name), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
        lines.append(f"{record},,")
        dst.writestr(record, "\n".join(lines) + "\n")
    os.replace(tmp, path)
    return before, os.path.getsize(path)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    size_before, size_after = slim(sys.argv[1], sys.argv[2:])
    print(f"{os.path.basename(sys.argv[1])}: {size_before / 2**20:.1f} MiB -> {size_after / 2**20:.1f} MiB")
