"""Small C kernels for CPU hot paths, compiled on first use for the machine that runs them.

Each kernel is one C file beside this module. ``load(name)`` compiles it with the system's C compiler
(``-O3 -march=native``) into a cache folder keyed by the source, the compiler, its flags and this CPU, and loads it
with ctypes, its functions typed from ``SIGNATURES``; later processes reuse the file. Without a compiler (or with
``NECTAR_NATIVE=off``) it returns None and callers keep their PyTorch path, so a kernel is only ever an optional
speed-up.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from nectar.settings import current

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).parent
_POINTER, _LONG, _FLOAT = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
SIGNATURES = {  # library -> function -> argument types (every function returns nothing)
    "kernels": {
        "nectar_matmul_f32": [_POINTER] * 4 + [_LONG] * 3,  # x, w, bias, y, rows, n_in, n_out
        "nectar_int8_logits": [_POINTER] * 5 + [_LONG] * 2,  # x, q, scales, bias, out, vocab, hidden
        "nectar_llama_decode_f32": (
            [_POINTER, _LONG, _POINTER, _POINTER, _FLOAT]  # x, hidden, norms, eps
            + [_POINTER, _POINTER, _LONG, _LONG, _LONG]  # qkv, heads, kv heads, head dim
            + [_POINTER] * 4
            + [_LONG]  # o, gate_up, intermediate
            + [_POINTER] * 4  # down, cos, signed sin
            + [_POINTER, _POINTER, _LONG, _LONG, _LONG, _FLOAT]  # keys, values, strides, length, scale
            + [_POINTER]  # scratch
        ),
        "nectar_decode_attention_f32": (
            [_POINTER]
            + [_LONG] * 5  # qkv, its row stride, sessions, heads, kv heads, head dim
            + [_POINTER] * 4  # keys, values (pointer arrays), head strides, lengths
            + [_FLOAT, _POINTER, _POINTER]  # scale, out, scratch
        ),
    },
}
FLAG_SETS = (["-O3", "-march=native"], ["-O3"])  # -march=native is unknown to some compilers (e.g. on arm64 macOS)
COMPILE_TIMEOUT = 120  # s


def cache_folder() -> Path:
    return current().kernel_cache  # NECTAR_KERNEL_CACHE, else under XDG_CACHE_HOME


def enabled() -> bool:
    return current().native  # NECTAR_NATIVE


def _compiler() -> str | None:
    return current().compiler or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_signature() -> str:
    """What -march=native depends on: a library built for one CPU may not run on another sharing the cache."""
    signature = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("model name", "flags", "Features")):
                    signature += line
                if line.strip() == "":
                    break  # the first processor describes them all
    except OSError:
        signature += platform.processor()
    return signature


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel ``name`` (``{name}.c`` here), or None where it cannot be built (warned once)."""
    if not enabled():
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning(
            "No C compiler found: the native %s kernel is off and PyTorch computes instead. "
            "Install one (e.g. `apt install gcc`) or set CC to enable it.",
            name,
        )
        return None
    source = SOURCES / f"{name}.c"
    text = source.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(
            b"\0".join([text, compiler.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
        ).hexdigest()[:16]
        library = cache_folder() / f"{name}-{key}.so"
        if not library.exists():
            error = _compile(compiler, flags, source, library)
            if error:
                errors.append(f"{compiler} {' '.join(flags)}: {error}")
                continue
        try:
            return _typed(ctypes.CDLL(str(library)), name)
        except (OSError, AttributeError) as e:
            errors.append(f"loading {library}: {e}")
    logger.warning(
        "The native %s kernel could not be built, so PyTorch computes instead (set NECTAR_NATIVE=off to "
        "silence this):\n%s",
        name,
        "\n".join(errors),
    )
    return None


def _typed(library: ctypes.CDLL, name: str) -> ctypes.CDLL:
    """Sets the argument types of ``library``'s functions (an AttributeError if one is missing)."""
    for function, argtypes in SIGNATURES.get(name, {}).items():
        entry = getattr(library, function)
        entry.argtypes, entry.restype = argtypes, None
    return library


def _compile(compiler: str, flags: list[str], source: Path, library: Path) -> str | None:
    """Builds ``library``; returns the compiler's complaint, or None. Concurrent builders each write their own
    temporary file and rename it into place, so a reader never sees half a library."""
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(handle)
    try:
        done = subprocess.run(
            [compiler, *flags, "-shared", "-fPIC", "-std=c11", "-o", partial, str(source), "-lm"],
            capture_output=True,
            text=True,
            timeout=COMPILE_TIMEOUT,
        )
        if done.returncode != 0:
            return done.stderr.strip()[-2000:] or f"exit status {done.returncode}"
        os.replace(partial, library)
        logger.info("Compiled the native %s kernel (%s)", source.stem, library)
        return None
    except (OSError, subprocess.SubprocessError) as e:
        return str(e)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
