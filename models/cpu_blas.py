"""Float32 products with [in, out] weights on CPU through whichever BLAS is faster on this machine.

PyTorch's CPU wheels multiply through MKL; numpy's wheels carry OpenBLAS. On a 2-core AMD EPYC VM, numpy's OpenBLAS
streamed a decode step's weights 1.2-1.5x as fast (one row through tiny's 8 blocks with 1 thread:
5.2 vs 6.6 ms, 19.5 vs 15.3 GB/s; with 2 threads 1.3-1.9x for 1 to 64 rows), while MKL was faster for 2-3 rows on
one thread. Which library wins depends on the CPU, the thread count and the number of rows, so ``CpuMatmul.calibrate``
times both on the caller's own matrices at load and picks per row count. The two agree to float32 rounding (summation
order only). ``NECTAR_CPU_BLAS=torch`` or ``=openblas`` skips the measurement and uses one library for every product.
OpenBLAS's threads follow ``use_threads``; importing ``nectar`` stops its idle threads from spinning (core/__init__.py).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 64)  # a product with n rows is timed as the smallest bucket >= n (the last above)
CALIBRATION_BYTES = 64 << 20  # weights read per timed pass: more than a CPU's last-level cache, as in a real step
MIN_GAIN = 1.03  # OpenBLAS must be this much faster to be chosen (both measured with noise)


def use_threads(threads: Optional[int]) -> None:
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


class CpuMatmul:
    """``x @ matrix (+ bias)`` for 2-D float32 CPU inputs without gradients; ``openblas_rows`` are the row buckets
    computed through numpy's OpenBLAS, the others through PyTorch."""

    def __init__(self, openblas_rows: Sequence[int] = (), gains: Optional[dict[int, float]] = None):
        self.openblas_rows = frozenset(openblas_rows)
        self.gains = gains or {}

    def __call__(self, x: torch.Tensor, matrix: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if _bucket(x.shape[0]) in self.openblas_rows and x.dtype == torch.float32 and x.device.type == "cpu":
            out = torch.from_numpy(np.matmul(x.numpy(), matrix.numpy()))
            return out.add_(bias) if bias is not None else out
        return torch.addmm(bias, x, matrix) if bias is not None else x @ matrix

    @classmethod
    def calibrate(cls, matrices: Sequence[torch.Tensor], *, rows: Sequence[int] = ROW_BUCKETS,
                  repeats: int = 3) -> "CpuMatmul":
        """Times both libraries on ``matrices`` ([in, out], float32, CPU) for each of the ``rows`` buckets (the others
        use PyTorch), with the threads set (``use_threads``) for the caller; honours ``NECTAR_CPU_BLAS``."""
        choice = os.environ.get("NECTAR_CPU_BLAS", "auto").lower()
        if choice in ("torch", "mkl"):
            return cls(())
        if choice == "openblas":
            return cls(ROW_BUCKETS)
        if choice != "auto":
            raise ValueError(f"NECTAR_CPU_BLAS must be auto, torch or openblas, got {choice!r}")
        timed = _calibration_set(matrices)
        if not timed:
            return cls(())
        began = time.perf_counter()
        chosen, gains = [], {}
        libraries = (("torch", cls(())), ("openblas", cls(ROW_BUCKETS)))
        with torch.inference_mode():
            for count in rows:
                inputs = [torch.randn(count, matrix.shape[0]) for matrix in timed]
                seconds = {"torch": [], "openblas": []}
                for _ in range(repeats):  # alternating, so both see the same moments of a noisy machine
                    for name, matmul in libraries:
                        start = time.perf_counter()
                        for x, matrix in zip(inputs, timed):
                            matmul(x, matrix)
                        seconds[name].append(time.perf_counter() - start)
                gains[count] = min(seconds["torch"]) / min(seconds["openblas"])
                if gains[count] >= MIN_GAIN:
                    chosen.append(count)
        plan = cls(chosen, gains)
        logger.info("CPU matmuls: %s (measured in %.2fs)", plan.describe(), time.perf_counter() - began)
        return plan

    def describe(self) -> str:
        """E.g. "OpenBLAS for rows 1, <=64; PyTorch for rows <=2, ... (OpenBLAS speed-up 1: 1.29x, ...)"."""
        def rows(buckets):
            return ", ".join(f"<={b}" if b > 1 else "1" for b in buckets) or "none"

        gains = ", ".join(f"{b}: {g:.2f}x" for b, g in sorted(self.gains.items()))
        openblas = sorted(self.openblas_rows)
        others = [b for b in ROW_BUCKETS if b not in self.openblas_rows]
        text = f"OpenBLAS for rows {rows(openblas)}; PyTorch for rows {rows(others)}"
        return f"{text} (OpenBLAS speed-up {gains})" if gains else text


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
