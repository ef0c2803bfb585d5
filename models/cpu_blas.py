"""Float32 products with [in, out] weights on CPU through whichever library is fastest on this machine.

PyTorch's CPU wheels multiply through MKL; numpy's wheels carry OpenBLAS; ``nectar.models.native`` compiles a small
kernel that reads the weights in one sequential stream (``native/kernels.c``). On a 2-core AMD EPYC VM, one row
through tiny's 8 blocks with 1 thread took 6.6 ms with MKL, 5.2-5.9 ms with OpenBLAS and 4.3 ms with the kernel;
OpenBLAS with 2 threads was 1.3-1.9x MKL for 1 to 64 rows, while MKL won 2-3 rows on one thread. Which library wins
depends on the CPU, the thread count and the number of rows, so ``CpuMatmul.calibrate`` times them on the caller's
own matrices at load and picks per row count. They agree to float32 rounding (summation order only).
``NECTAR_CPU_BLAS=torch``, ``=openblas`` or ``=native`` skips the measurement and uses one library for every product.
OpenBLAS's threads follow ``use_threads``; importing ``nectar`` stops its idle threads from spinning (core/__init__.py).
The kernel runs on the calling thread only, so it is timed for at most ``NATIVE_MAX_ROWS`` rows.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from nectar.models import native
from nectar.settings import current

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 64)  # a product with n rows is timed as the smallest bucket >= n (the last above)
LIBRARIES = ("torch", "openblas", "native")
NAMES = {"torch": "PyTorch", "openblas": "OpenBLAS", "native": "native"}
NATIVE_MAX_ROWS = 8  # it reads the weights once but computes row after row: more rows are a BLAS's job
CALIBRATION_BYTES = 64 << 20  # weights read per timed pass: more than a CPU's last-level cache, as in a real step
MIN_GAIN = 1.03  # another library must be this much faster than PyTorch to be chosen (both measured with noise)


def use_threads(threads: int | None) -> None:
    """Sets the calling process's compute threads for PyTorch (this thread) and for numpy's OpenBLAS."""
    if not threads:
        return
    torch.set_num_threads(threads)
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads, user_api="blas")


def _bucket(rows: int) -> int:
    for bucket in ROW_BUCKETS:
        if rows <= bucket:
            return bucket
    return ROW_BUCKETS[-1]


def native_kernel() -> ctypes.CDLL | None:
    """``native/kernels.c`` compiled for this machine (its functions typed), or None."""
    return native.load("kernels")


def native_matmul(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ matrix (+ bias)`` through the native kernel: x [rows, in], matrix [in, out] contiguous, float32, CPU."""
    x = x.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty(x.shape[0], matrix.shape[1])
    native_kernel().nectar_matmul_f32(
        x.data_ptr(),
        matrix.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        x.shape[0],
        matrix.shape[0],
        matrix.shape[1],
    )
    return out


class CpuMatmul:
    """``x @ matrix (+ bias)`` for 2-D float32 CPU inputs without gradients; ``chosen`` maps row buckets to the
    library that computes them ("openblas" or "native"); the others, and every other input, go through PyTorch."""

    def __init__(self, chosen: Mapping[int, str] | None = None, gains: dict[int, dict[str, float]] | None = None):
        self.chosen = {bucket: name for bucket, name in (chosen or {}).items() if name != "torch"}
        unknown = set(self.chosen.values()) - set(LIBRARIES)
        if unknown:
            raise ValueError(f"unknown CPU matmul libraries {sorted(unknown)}; choose from {LIBRARIES}")
        if "native" in self.chosen.values() and native_kernel() is None:
            raise RuntimeError(
                "the native matmul kernel is not available on this machine (no C compiler, or "
                "NECTAR_NATIVE=off); use NECTAR_CPU_BLAS=auto, torch or openblas"
            )
        self.gains = gains or {}

    @classmethod
    def everywhere(cls, library: str) -> CpuMatmul:
        return cls({bucket: library for bucket in ROW_BUCKETS})

    def rows_for(self, library: str) -> frozenset:
        """The row buckets ``library`` computes."""
        if library == "torch":
            return frozenset(b for b in ROW_BUCKETS if b not in self.chosen)
        return frozenset(b for b, name in self.chosen.items() if name == library)

    def __call__(self, x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        library = self.chosen.get(_bucket(x.shape[0])) if self.chosen else None
        if library is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            if library == "native" and matrix.dtype == torch.float32 and matrix.is_contiguous():
                return native_matmul(x, matrix, bias)
            if library == "openblas":
                out = torch.from_numpy(np.matmul(x.numpy(), matrix.numpy()))
                return out.add_(bias) if bias is not None else out
        return torch.addmm(bias, x, matrix) if bias is not None else x @ matrix

    @classmethod
    def calibrate(
        cls, matrices: Sequence[torch.Tensor], *, rows: Sequence[int] = ROW_BUCKETS, repeats: int = 3
    ) -> CpuMatmul:
        """Times each library on ``matrices`` ([in, out], float32, CPU) for each of the ``rows`` buckets (the others
        use PyTorch), with the threads set (``use_threads``) for the caller; honours ``NECTAR_CPU_BLAS``."""
        choice = current().cpu_blas  # NECTAR_CPU_BLAS, validated by nectar.settings (mkl = torch)
        if choice in LIBRARIES:
            return cls.everywhere(choice)
        timed = _calibration_set(matrices)
        if not timed:
            return cls()
        began = time.perf_counter()
        candidates = [name for name in LIBRARIES if name != "native" or native_kernel() is not None]
        chosen, gains = {}, {}
        with torch.inference_mode():
            for count in rows:
                inputs = [torch.randn(count, matrix.shape[0]) for matrix in timed]
                libraries = [
                    (name, cls.everywhere(name)) for name in candidates if name != "native" or count <= NATIVE_MAX_ROWS
                ]
                seconds = {name: [] for name, _ in libraries}
                for _ in range(repeats):  # interleaved, so all see the same moments of a noisy machine
                    for name, matmul in libraries:
                        start = time.perf_counter()
                        for x, matrix in zip(inputs, timed):
                            matmul(x, matrix)
                        seconds[name].append(time.perf_counter() - start)
                best = {name: min(times) for name, times in seconds.items()}
                gains[count] = {name: best["torch"] / s for name, s in best.items() if name != "torch"}
                fastest = max(gains[count], key=gains[count].get)
                if gains[count][fastest] >= MIN_GAIN:
                    chosen[count] = fastest
        plan = cls(chosen, gains)
        logger.info("CPU matmuls: %s (measured in %.2fs)", plan.describe(), time.perf_counter() - began)
        return plan

    def describe(self) -> str:
        """E.g. "native for rows 1; OpenBLAS for rows <=64; PyTorch for rows <=2, ... (speed-up over PyTorch:
        1 row: native 1.52x, OpenBLAS 1.21x; ...)"."""

        def rows(buckets):
            return ", ".join(f"<={b}" if b > 1 else "1" for b in sorted(buckets)) or "none"

        parts = [
            f"{NAMES[name]} for rows {rows(self.rows_for(name))}"
            for name in LIBRARIES
            if name == "torch" or self.rows_for(name)
        ]
        text = "; ".join(parts[1:] + parts[:1])  # PyTorch, the default, last
        if not self.gains:
            return text

        def speedups(bucket):
            return ", ".join(f"{NAMES[name]} {gain:.2f}x" for name, gain in self.gains[bucket].items())

        gains = "; ".join(
            f"{bucket} row{'s' if bucket > 1 else ''}: {speedups(bucket)}" for bucket in sorted(self.gains)
        )
        return f"{text} (speed-up over PyTorch: {gains})"


def _calibration_set(matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The float32 CPU matrices to time: in order, until a pass reads ``CALIBRATION_BYTES`` (all if fewer)."""
    chosen, total = [], 0
    for matrix in matrices:
        if matrix.dtype != torch.float32 or matrix.device.type != "cpu" or not matrix.is_contiguous():
            continue
        chosen.append(matrix)
        total += matrix.numel() * matrix.element_size()
        if total >= CALIBRATION_BYTES:
            break
    return chosen
