"""Rounding shared by the Triton kernels (``nf4_triton``, the Llama decode route): casts that round as PyTorch's.

``TRITON_INTERPRET=1`` (CPU tests) runs the kernels through numpy, whose casts and products differ from a GPU's in
two places handled here: a float32 -> bfloat16 cast truncates, and a bfloat16 ``tl.dot`` computes garbage.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# False under the interpreter: CUDA's precise expf and rsqrtf (libdevice) and bfloat16 products are not there
PRECISE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """To ``dtype`` (float16 or bfloat16), to nearest even as PyTorch casts. The interpreter's float32 -> bfloat16
    cast truncates whatever the rounding asked, so there the bits are rounded by hand."""
    if not PRECISE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype, fp_downcast_rounding="rtne")
    return y


@triton.jit
def dot(a, b, acc):
    """``acc + a @ b`` for float16/bfloat16 tiles, products exact and sums in float32 (as tensor cores compute)."""
    if PRECISE:
        y = tl.dot(a, b, acc)
    else:
        y = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return y


__all__ = ["PRECISE", "round_to", "dot"]
