"""nf4 products of a few rows in one Triton kernel that reads bitsandbytes' codes once, at the GPU's bandwidth.

bitsandbytes' fused 4-bit kernel reads a lone row's codes at 0.86-1.19 TB/s on an H100 (stop 38), a third of what
the GPU copies; past a few rows it dequantizes the whole matrix into a float copy, then calls cuBLAS (0.2-0.4 TB/s of
codes for 16 rows). Both bound an nf4 node's decode rounds: a 70B lone session reached 28% of the weights' floor.

Here each program reads a tile of codes with their (double-quantized) block scales, dequantizes them in registers
exactly as bitsandbytes' dequantize does (``float16(code_value * absmax)``; absmax ``code2[q] * absmax2 + offset``
in float32), and multiplies in float32: one row by a reduction, up to 16 rows by ``tl.dot`` on the tensor cores. So
the weights a row meets are the very values bitsandbytes' dequantize-then-``F.linear`` path multiplies, and only the
order of float32 sums differs (as between any two GPUs' kernels; audits allow for it). Used by ``quant.NF4Rows``.
``TRITON_INTERPRET=1`` runs it on a CPU (tests/speed).
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from nectar.models.families.llama.triton_decode import _PRECISE, _round
from nectar.settings import current

MAX_ROWS = 16  # rows one product takes here (the tensor-core tile); more go to bitsandbytes' path
GROUP = 32  # bytes (64 codes) that share one absmax: bitsandbytes' nf4 blocksize of 64
NESTED_BLOCKS = 256  # absmax values that share one second-level scale (bitsandbytes' double quantization)


@triton.jit
def _nf4_value(
    code, lut_ptr, SELECT: tl.constexpr, v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15
):
    """The float32 value of each 4-bit code: a gather from the 16-entry table, or (SELECT) a tree of selects among
    the same 16 constants, which costs ALU work instead of a load per weight."""
    if SELECT:
        b = (code & 1) != 0
        a0, a1, a2, a3 = tl.where(b, v1, v0), tl.where(b, v3, v2), tl.where(b, v5, v4), tl.where(b, v7, v6)
        a4, a5, a6, a7 = tl.where(b, v9, v8), tl.where(b, v11, v10), tl.where(b, v13, v12), tl.where(b, v15, v14)
        b = (code & 2) != 0
        c0, c1, c2, c3 = tl.where(b, a1, a0), tl.where(b, a3, a2), tl.where(b, a5, a4), tl.where(b, a7, a6)
        b = (code & 4) != 0
        d0, d1 = tl.where(b, c1, c0), tl.where(b, c3, c2)
        value = tl.where((code & 8) != 0, d1, d0)
    else:
        value = tl.load(lut_ptr + code)
    return value


@triton.jit
def _scale(code, absmax2, offset):
    """A nested absmax as bitsandbytes computes it: the product rounded to float32, then the offset added (not one
    fused multiply-add, which the compiler would otherwise make of it and which rounds once)."""
    if _PRECISE:
        y = libdevice.add_rn(libdevice.mul_rn(code, absmax2), offset)
    else:
        y = code * absmax2 + offset
    return y


@triton.jit
def _nf4_product(
    x_ptr,
    codes_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    offset,
    lut_ptr,
    out_ptr,
    rows,
    n_out,
    half_k,  # bytes of codes per output feature (in_features / 2)
    split_bytes,  # bytes of a row's codes each split of the K axis reads (a multiple of BLOCK_J)
    stride_x,
    stride_out_split,
    stride_out,
    NESTED: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,  # bytes of codes per output feature per iteration (a multiple of GROUP)
    BLOCK_R: tl.constexpr,  # 1: one row, reduced on the CUDA cores; 16: up to 16 rows through tl.dot
    PAIRED_X: tl.constexpr,  # one row: read x's (even, odd) pairs in one load (else two strided ones)
    SELECT: tl.constexpr,  # codes to values by selects among the table's constants (else a gather per weight)
    v0,
    v1,
    v2,
    v3,
    v4,
    v5,
    v6,
    v7,
    v8,
    v9,
    v10,
    v11,
    v12,
    v13,
    v14,
    v15,
):
    pid_n, pid_s = tl.program_id(0), tl.program_id(1)
    groups: tl.constexpr = BLOCK_J // 32
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.arange(0, groups)
    t = tl.arange(0, 32)
    n_ok = n < n_out
    n3 = n[:, None, None]
    blocks_per_feature = half_k // 32
    begin = pid_s * split_bytes
    end = tl.minimum(begin + split_bytes, half_k)
    if BLOCK_R == 1:  # per-thread partial sums, reduced across threads once after the loop
        acc = tl.zeros([BLOCK_N, groups, 32], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
        r = tl.arange(0, BLOCK_R)
    for j0 in range(begin, end, BLOCK_J):
        j = j0 + g[:, None] * 32 + t[None, :]  # [groups, 32] byte index along the feature's codes
        j_ok = j < end
        ok = n_ok[:, None, None] & j_ok[None, :, :]
        packed = tl.load(codes_ptr + n3 * half_k + j[None, :, :], mask=ok, other=0).to(tl.int32)
        block = n[:, None] * blocks_per_feature + (j0 // 32 + g[None, :])  # [BLOCK_N, groups]
        block_ok = n_ok[:, None] & (j0 // 32 + g[None, :] < end // 32)
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=block_ok, other=0).to(tl.int32)
            scale = _scale(
                tl.load(code2_ptr + q), tl.load(absmax2_ptr + block // 256, mask=block_ok, other=0.0), offset
            )
        else:
            scale = tl.load(absmax_ptr + block, mask=block_ok, other=0.0)
        scale = scale[:, :, None]
        table = (v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15)
        high = _round(_nf4_value(packed >> 4, lut_ptr, SELECT, *table) * scale, DTYPE)  # element 2j: the high nibble
        low = _round(_nf4_value(packed & 15, lut_ptr, SELECT, *table) * scale, DTYPE)  # element 2j + 1
        if BLOCK_R == 1:
            if PAIRED_X:  # one contiguous load of the pairs, split in registers
                pair = tl.arange(0, 2)
                xs = tl.load(x_ptr + 2 * j[:, :, None] + pair[None, None, :], mask=j_ok[:, :, None], other=0.0)
                x_even, x_odd = tl.split(xs.to(tl.float32))
            else:
                x_even = tl.load(x_ptr + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)
            acc += high.to(tl.float32) * x_even[None, :, :] + low.to(tl.float32) * x_odd[None, :, :]
        else:
            jj = j0 + tl.arange(0, BLOCK_J)
            xm = (jj[:, None] < end) & (r[None, :] < rows)
            x_even = tl.load(x_ptr + r[None, :] * stride_x + 2 * jj[:, None], mask=xm, other=0.0)
            x_odd = tl.load(x_ptr + r[None, :] * stride_x + 2 * jj[:, None] + 1, mask=xm, other=0.0)
            high, low = tl.reshape(high, (BLOCK_N, BLOCK_J)), tl.reshape(low, (BLOCK_N, BLOCK_J))
            if not _PRECISE:  # the interpreter's bfloat16 products are wrong; float32 multiplies the same values
                high, low = high.to(tl.float32), low.to(tl.float32)
                x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
            acc = tl.dot(high, x_even, acc)
            acc = tl.dot(low, x_odd, acc)
    out = out_ptr + pid_s * stride_out_split
    if BLOCK_R == 1:
        tl.store(out + n, tl.sum(tl.sum(acc, axis=2), axis=1), mask=n_ok)
    else:
        tl.store(out + r[None, :] * stride_out + n[:, None], acc, mask=n_ok[:, None] & (r[None, :] < rows))


# (BLOCK_N, BLOCK_J, warps, paired x, select, programs) per path: programs is about how many the K axis is split into
# for each matrix (264: two per SM of an H100), so that narrow matrices too spread over every SM
ONE_ROW = (16, 128, 4, False, False, 264)
SEVERAL_ROWS = (64, 64, 4, False, False, 264)


def configured_tiles() -> dict[str, tuple]:
    """The tiles of each path: ``nf4_tiles`` (JSON, as benchmarks/quant/bench_nf4_kernel.py prints the fastest) over
    the built-in ones."""
    tiles = {"one_row": ONE_ROW, "several_rows": SEVERAL_ROWS}
    text = current().nf4_tiles
    if text:
        try:
            chosen = json.loads(text)
            for path, default in tiles.items():
                if path in chosen:
                    value = tuple(chosen[path])
                    if len(value) != len(default):
                        raise ValueError(f"{path} takes {len(default)} values")
                    tiles[path] = value
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"NECTAR_NF4_TILES is not valid ({error}): give JSON such as "
                '{"one_row": [16, 128, 4, false, false, 264], "several_rows": [64, 64, 4, false, false, 264]}'
            ) from None
    return tiles


class NF4Kernel:
    """One nf4 ``Linear4bit``'s products of up to ``MAX_ROWS`` rows through ``_nf4_product``.

    Inputs the kernel reads are kept on the layer's device once (the code tables, the nested scales' offset), so a
    call launches only the product (and a sum of the K splits, where there are several) and records in CUDA graphs.
    """

    def __init__(self, linear, *, one_row: tuple | None = None, several_rows: tuple | None = None):
        state = linear.weight.quant_state
        self.linear, self.state = linear, state
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if state.quant_type != "nf4" or state.blocksize != 64 or self.in_features % 64:
            raise ValueError("the nf4 kernel takes bitsandbytes' nf4 codes in blocks of 64 along whole rows")
        if state.nested and state.state2.blocksize != NESTED_BLOCKS:
            raise ValueError(f"the nf4 kernel takes nested scales in blocks of {NESTED_BLOCKS}")
        device = linear.weight.device
        self.codes = linear.weight.data.view(-1)
        self.lut = state.code.to(device, torch.float32).contiguous()
        # the same float32 values as kernel arguments v0..v15 (exact as Python floats), for the select tree
        self.table = {f"v{i}": float(v) for i, v in enumerate(state.code.float().tolist())}
        if state.nested:
            self.absmax = state.absmax.contiguous()
            self.code2 = state.state2.code.to(device, torch.float32).contiguous()
            self.absmax2 = state.state2.absmax.to(device, torch.float32).contiguous()
            self.offset = float(state.offset)
        else:
            self.absmax = state.absmax.to(torch.float32).contiguous()
            self.code2 = self.absmax2 = self.absmax
            self.offset = 0.0
        if one_row is None or several_rows is None:
            tiles = configured_tiles()
            one_row, several_rows = one_row or tiles["one_row"], several_rows or tiles["several_rows"]
        self.configs = {1: one_row, MAX_ROWS: several_rows}
        self.max_rows = MAX_ROWS
        if self.out_features * self.in_features >= 2**31:  # the kernel indexes codes and scales in int32
            raise ValueError("a matrix of 2^31 weights or more")
        self.bias = linear.bias

    def splits(self, block_r: int) -> tuple[int, int]:
        """(splits of the K axis, bytes each reads): enough programs for the GPU, each at least one tile long."""
        block_n, block_j, *_, programs = self.configs[block_r]
        half_k = self.in_features // 2
        tiles = triton.cdiv(half_k, block_j)
        splits = max(1, min(tiles, programs // triton.cdiv(self.out_features, block_n)))
        split_bytes = triton.cdiv(tiles, splits) * block_j
        return triton.cdiv(half_k, split_bytes), split_bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"the nf4 kernel takes 1 to {MAX_ROWS} rows, got {rows}")
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        block_r = 1 if rows == 1 else MAX_ROWS
        block_n, block_j, warps, paired, select, _ = self.configs[block_r]
        splits, split_bytes = self.splits(block_r)
        partial = torch.empty(splits, rows, self.out_features, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(self.out_features, block_n), splits)
        _nf4_product[grid](
            x2,
            self.codes,
            self.absmax,
            self.code2,
            self.absmax2,
            self.offset,
            self.lut,
            partial,
            rows,
            self.out_features,
            self.in_features // 2,
            split_bytes,
            x2.stride(0),
            partial.stride(0),
            partial.stride(1),
            NESTED=self.state.nested,
            DTYPE=tl.float16 if x.dtype == torch.float16 else tl.bfloat16,
            BLOCK_N=block_n,
            BLOCK_J=block_j,
            BLOCK_R=block_r,
            PAIRED_X=paired,
            SELECT=select,
            **self.table,
            num_warps=warps,
        )
        out = partial[0] if splits == 1 else partial.sum(0)
        if self.bias is not None:  # in float32, then one rounding (as cuBLAS adds a bias)
            out = out + self.bias.float()
        return out.to(x.dtype).view(*shape[:-1], self.out_features)
