"""Few-row products with nf4 weights in one Triton kernel: the codes are dequantized in registers, never to memory.

bitsandbytes computes ``x @ W^T`` for nf4 codes in one of two ways: a single row through its one-row kernel, which
reads the codes at about 0.5 TB/s on an H100 (a Llama-2-7B-shaped round 6.9 ms against 1.2 ms for its 3.6 GB), or
several rows by dequantizing the whole matrix into a float16 temporary and multiplying that (a 70B round of 16
sessions took 350 ms, and a recorded round's memory pool would keep the temporaries). Here one kernel reads each
byte of codes once for up to ``MAX_ROWS`` rows.

Each weight is rounded exactly as bitsandbytes dequantizes it (``code[q] * absmax`` in float32, then to the
compute dtype; a double-quantized absmax is ``code2[a] * absmax2 + offset`` first), so what differs from its
products is only the order of float32 sums, as between any two GPUs' kernels: audits recompute the same weights.
``TRITON_INTERPRET=1`` runs the kernel on a CPU (tests/speed).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from nectar.models.triton_rounding import dot, round_to

logger = logging.getLogger(__name__)

MAX_ROWS = 16  # rows one launch computes (tl.dot's smallest tile); more go through bitsandbytes
BLOCK = 64  # nf4 block size this kernel reads (the one quant.NF4_BLOCKSIZE writes)


@triton.jit
def _nf4_matmul(
    x_ptr,
    codes_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    offset,
    nf4_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    NESTED: tl.constexpr,
    NESTED_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    GROUPS: tl.constexpr = BLOCK_K // 64
    HALF: tl.constexpr = BLOCK_K // 2
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    rg = tl.arange(0, GROUPS)
    rj = tl.arange(0, 32)
    rt = tl.arange(0, HALF)
    n_ok = rn < N
    m_ok = rm < M
    blocks_per_row = K // 64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # a row's codes for [k0, k0 + BLOCK_K): GROUPS blocks of 32 bytes, two weights a byte (high nibble first)
        byte = rn[:, None, None] * (K // 2) + k0 // 2 + rg[None, :, None] * 32 + rj[None, None, :]
        packed = tl.load(codes_ptr + byte, mask=n_ok[:, None, None], other=0).to(tl.int32)
        block = rn[:, None] * blocks_per_row + k0 // 64 + rg[None, :]
        if NESTED:
            quantized = tl.load(absmax_ptr + block, mask=n_ok[:, None], other=0).to(tl.int32)
            second = tl.load(absmax2_ptr + block // NESTED_BLOCK, mask=n_ok[:, None], other=0.0)
            scale = tl.load(code2_ptr + quantized) * second + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=n_ok[:, None], other=0.0)
        scale = scale[:, :, None]
        high = round_to(tl.load(nf4_ptr + (packed >> 4)) * scale, dtype)
        low = round_to(tl.load(nf4_ptr + (packed & 15)) * scale, dtype)
        high = tl.reshape(high, (BLOCK_N, HALF))
        low = tl.reshape(low, (BLOCK_N, HALF))
        column = k0 + 2 * rt
        x_even = tl.load(x_ptr + rm[:, None] * stride_xm + column[None, :], mask=m_ok[:, None], other=0.0)
        x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + column[None, :] + 1, mask=m_ok[:, None], other=0.0)
        acc = dot(x_even, tl.trans(high), acc)
        acc = dot(x_odd, tl.trans(low), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, round_to(acc, dtype), mask=m_ok[:, None] & n_ok[None, :])


class NF4Product:
    """``linear(x)`` for a bitsandbytes nf4 ``Linear4bit`` on a GPU: rows up to ``MAX_ROWS`` through the kernel,
    more through the module itself. The quantization state's tensors are read where they lie (no copies)."""

    def __init__(self, linear: torch.nn.Module):
        state = linear.weight.quant_state
        self.linear = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.codes = linear.weight.data
        self.nested = bool(state.nested)
        self.nf4 = state.code.to(device=self.codes.device, dtype=torch.float32)
        if self.nested:
            self.absmax, self.code2, self.absmax2 = state.absmax, state.state2.code, state.state2.absmax
            self.offset, self.nested_block = float(state.offset), int(state.state2.blocksize)
        else:
            self.absmax = state.absmax.float()
            self.code2 = self.absmax2 = self.absmax  # unread
            self.offset, self.nested_block = 0.0, 1
        self.bias = linear.bias
        self.error: str | None = None  # why the kernel was given up (Triton could not build it for this device)
        self.choose_tiles()

    def choose_tiles(self) -> None:
        """Tile sizes (benchmarks/gpu/nf4_kernel.py --sweep times others): narrow tiles of outputs, so that the
        narrow (key/value) matrices too spread over every SM."""
        self.block_n = 16 if self.out_features <= 4096 else 32
        self.block_k = 256 if self.in_features % 256 == 0 else 128 if self.in_features % 128 == 0 else 64
        self.num_warps = 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > MAX_ROWS or x.dtype not in (torch.float16, torch.bfloat16) or torch.is_grad_enabled():
            return self.linear(x)
        if self.error is not None:
            return self.linear(x)
        try:
            return self._product(x, rows)
        except Exception as error:
            if not type(error).__module__.startswith("triton"):  # not a kernel Triton cannot build: the round's
                raise
            self.error = f"{type(error).__name__}: {str(error)[:300]}"
            logger.warning(f"The nf4 Triton kernel failed ({self.error}); this layer uses bitsandbytes' kernels")
            return self.linear(x)

    def warm(self, dtype: torch.dtype) -> bool:
        """Builds the kernel now (not inside the first recorded round); False if Triton cannot build it here."""
        with torch.inference_mode():
            self(torch.zeros(1, self.in_features, device=self.codes.device, dtype=dtype))
        return self.error is None

    def _product(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        flat = x.reshape(rows, self.in_features)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        out = torch.empty(rows, self.out_features, device=x.device, dtype=x.dtype)
        grid = (triton.cdiv(self.out_features, self.block_n),)
        _nf4_matmul[grid](
            flat,
            self.codes,
            self.absmax,
            self.code2,
            self.absmax2,
            self.offset,
            self.nf4,
            self.bias if self.bias is not None else out,
            out,
            rows,
            self.out_features,
            self.in_features,
            flat.stride(0),
            out.stride(0),
            NESTED=self.nested,
            NESTED_BLOCK=self.nested_block,
            HAS_BIAS=self.bias is not None,
            BLOCK_M=MAX_ROWS,
            BLOCK_N=self.block_n,
            BLOCK_K=self.block_k,
            num_warps=self.num_warps,
        )
        return out.view(*x.shape[:-1], self.out_features)


def readable(linear: torch.nn.Module) -> bool:
    """Whether the kernel reads this layer's codes: nf4 in blocks of 64 along whole rows."""
    state = getattr(getattr(linear, "weight", None), "quant_state", None)
    return (
        state is not None
        and state.quant_type == "nf4"
        and state.blocksize == BLOCK
        and linear.in_features % BLOCK == 0
        and linear.weight.data.dtype == torch.uint8
    )


__all__ = ["MAX_ROWS", "NF4Product", "readable"]
