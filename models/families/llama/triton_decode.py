"""A Llama decode round in a few Triton kernels a block, rounded where PyTorch's eager kernels round.

The eager round launches about 30 kernels a block, 20 of them for norms, RoPE, casts, cache writes, SwiGLU and
residual adds: on an H100 they took 1.3 of the round's 6.4 ms (issue 25). Here a block is the three products
(cuBLAS, as eager) and five kernels: the residual add fused with the RMSNorm that follows it, RoPE fused with the
cache write, attention over the positions written so far (not the whole preallocated cache under a mask), and
SiLU times up. Each value is rounded to the model's dtype where transformers rounds it (every product, sum, norm
and activation), because audits score a node against a verifier that rounds so (stop 33: fusing intermediates in
float32 moved honest scores). What differs from eager: the order of float32 sums inside a norm and an attention
(as between any two GPUs' kernels), and attention's probabilities stay in float32 where SDPA's kernels round them
to float16 before multiplying the values.

Used by ``graphs.py`` for a GPU node's recorded float16/bfloat16 rounds (the default route, ``decode_route``);
``TRITON_INTERPRET=1`` runs the same kernels on a CPU (tests/speed).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# CUDA's precise expf and rsqrtf, as PyTorch's kernels call them (tl.exp is an approximation); the interpreter
# (TRITON_INTERPRET=1, CPU tests) has no libdevice, and numpy's are precise
_PRECISE = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _exp(x):
    if _PRECISE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _rsqrt(x):
    if _PRECISE:
        y = libdevice.rsqrt(x)
    else:
        y = tl.rsqrt(x)
    return y


# positions one attention program reads; a longer cache is split into chunks combined by a second kernel
ATTENTION_CHUNK = 256


@triton.jit
def _round(x, dtype: tl.constexpr):
    """To ``dtype`` (float16 or bfloat16), to nearest even as PyTorch casts. The interpreter's float32 -> bfloat16
    cast truncates whatever the rounding asked, so there the bits are rounded by hand."""
    if not _PRECISE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype, fp_downcast_rounding="rtne")
    return y


@triton.jit
def _add_rms_norm(
    delta_ptr, residual_ptr, weight_ptr, out_residual_ptr, out_ptr, hidden, eps, ADD: tl.constexpr, BLOCK: tl.constexpr
):
    """Row r: residual = delta + residual (rounded), then weight * rms_norm(residual) as LlamaRMSNorm rounds it."""
    row = tl.program_id(0).to(tl.int64)  # offsets in 64 bits: a pool of many long rows passes 2**31 elements
    cols = tl.arange(0, BLOCK)
    inside = cols < hidden
    x = tl.load(residual_ptr + row * hidden + cols, mask=inside, other=0.0)
    if ADD:
        delta = tl.load(delta_ptr + row * hidden + cols, mask=inside, other=0.0)
        x = _round(x.to(tl.float32) + delta.to(tl.float32), x.dtype)
        tl.store(out_residual_ptr + row * hidden + cols, x, mask=inside)
    upcast = x.to(tl.float32)
    variance = tl.sum(upcast * upcast, axis=0) * (1.0 / hidden)
    normed = _round(upcast * _rsqrt(variance + eps), x.dtype)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0)
    tl.store(out_ptr + row * hidden + cols, _round(weight.to(tl.float32) * normed.to(tl.float32), x.dtype), mask=inside)


@triton.jit
def _slot(tables_ptr, table_width, row, position, row_stride, position_stride, PAGE: tl.constexpr):
    """Offset of ``position`` (a scalar or a vector) of ``row``'s cache: in the row's own stretch of the pool, or
    (``PAGE`` > 0) in the page its table lists for it."""
    if PAGE > 0:
        page = tl.load(tables_ptr + row * table_width + position // PAGE).to(tl.int64)
        offset = page * row_stride + (position % PAGE) * position_stride
    else:
        offset = row * row_stride + position * position_stride
    return offset


@triton.jit(do_not_specialize=["table_width"])  # one build whatever the tables' width
def _rope_write(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    positions_ptr,
    cache_ptr,
    tables_ptr,
    table_width,
    row_stride,
    kv_stride,
    head_stride,
    position_stride,
    heads: tl.constexpr,
    kv_heads: tl.constexpr,
    DIM: tl.constexpr,
    PAGE: tl.constexpr,
):
    """Program (row, head) over qkv [n, heads + 2 * kv_heads, DIM]: RoPE on a query head (in place), or on a key
    head then its key and value into the cache at the row's position. Rounded as ``rope_in_place``: each product,
    then their sum. ``PAGE`` > 0: the cache is a page pool, the row's position in page tables[row, position // PAGE]
    (``row_stride`` then steps pages, ``position_stride`` slots within one)."""
    row = tl.program_id(0).to(tl.int64)  # offsets in 64 bits: a pool of many long rows passes 2**31 elements
    head = tl.program_id(1)
    position = tl.load(positions_ptr + row)
    cols = tl.arange(0, DIM)
    base = qkv_ptr + (row * (heads + 2 * kv_heads) + head) * DIM
    x = tl.load(base + cols)
    rolled = tl.load(base + (cols + DIM // 2) % DIM)
    cos = tl.load(cos_ptr + position * DIM + cols)
    sin = tl.load(sin_ptr + position * DIM + cols)
    straight = _round(x.to(tl.float32) * cos.to(tl.float32), x.dtype)
    turned = _round(rolled.to(tl.float32) * sin.to(tl.float32), x.dtype)
    rotated = _round(straight.to(tl.float32) + turned.to(tl.float32), x.dtype)
    if head < heads:
        tl.store(base + cols, rotated)
    else:
        slot = cache_ptr + _slot(tables_ptr, table_width, row, position, row_stride, position_stride, PAGE)
        slot += (head - heads) * head_stride + cols
        tl.store(slot, rotated)
        tl.store(slot + kv_stride, tl.load(base + kv_heads * DIM + cols))


@triton.jit(do_not_specialize=["chunk", "splits", "table_width"])  # one build whatever the cache's length
def _attention(
    qkv_ptr,
    positions_ptr,
    cache_ptr,
    tables_ptr,
    table_width,
    out_ptr,
    partial_ptr,
    stats_ptr,
    row_stride,
    kv_stride,
    head_stride,
    position_stride,
    scale,
    chunk_size,
    splits,
    heads: tl.constexpr,
    kv_heads: tl.constexpr,
    DIM: tl.constexpr,
    TILE: tl.constexpr,
    PAGE: tl.constexpr,
):
    """Program (row, head, chunk): softmax(q k^T * scale) v over the chunk's positions up to the row's own (float32
    throughout). One chunk writes the output; several write float32 partials and their (max, sum) for ``_combine``.
    ``PAGE`` > 0: positions are found through the row's page table, as in ``_rope_write``."""
    row = tl.program_id(0).to(tl.int64)  # offsets in 64 bits: a pool of many long rows passes 2**31 elements
    head = tl.program_id(1)
    chunk = tl.program_id(2)
    position = tl.load(positions_ptr + row).to(tl.int32)  # the loop's bounds in one type
    kv_head = head // (heads // kv_heads)
    cols = tl.arange(0, DIM)
    q = tl.load(qkv_ptr + (row * (heads + 2 * kv_heads) + head) * DIM + cols).to(tl.float32)
    keys = cache_ptr + kv_head * head_stride
    best = -float("inf")
    total = 0.0
    acc = tl.zeros([DIM], dtype=tl.float32)
    begin = chunk * chunk_size
    end = tl.minimum(begin + chunk_size, position + 1)
    for start in range(begin, end, TILE):
        at = start + tl.arange(0, TILE)
        valid = at < end
        slots = _slot(tables_ptr, table_width, row, tl.where(valid, at, 0), row_stride, position_stride, PAGE)
        k = tl.load(keys + slots[:, None] + cols[None, :], mask=valid[:, None], other=0.0)
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        scores = tl.where(valid, scores, -float("inf"))
        new_best = tl.maximum(best, tl.max(scores, axis=0))
        shrink = tl.exp(best - new_best)
        p = tl.exp(scores - new_best)
        v = tl.load(keys + kv_stride + slots[:, None] + cols[None, :], mask=valid[:, None], other=0.0)
        acc = acc * shrink + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        total = total * shrink + tl.sum(p, axis=0)
        best = new_best
    index = row * heads + head
    if splits == 1:
        tl.store(out_ptr + index * DIM + cols, _round(acc / total, out_ptr.dtype.element_ty))
    else:
        tl.store(partial_ptr + (index * splits + chunk) * DIM + cols, acc)
        tl.store(stats_ptr + (index * splits + chunk) * 2, best)
        tl.store(stats_ptr + (index * splits + chunk) * 2 + 1, total)


@triton.jit(do_not_specialize=["splits"])
def _combine(partial_ptr, stats_ptr, out_ptr, splits, DIM: tl.constexpr):
    """Program (row * heads + head): the chunks' partial attentions weighted by their softmax sums."""
    index = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, DIM)
    top = -float("inf")
    for part in range(0, splits):
        top = tl.maximum(top, tl.load(stats_ptr + (index * splits + part) * 2))
    acc = tl.zeros([DIM], dtype=tl.float32)
    total = 0.0
    for part in range(0, splits):
        best = tl.load(stats_ptr + (index * splits + part) * 2)
        weight = tl.where(best > -float("inf"), tl.exp(best - top), 0.0)  # a chunk past the position: no weight
        total += tl.load(stats_ptr + (index * splits + part) * 2 + 1) * weight
        acc += tl.load(partial_ptr + (index * splits + part) * DIM + cols) * weight
    tl.store(out_ptr + index * DIM + cols, _round(acc / total, out_ptr.dtype.element_ty))


@triton.jit
def _silu_mul(gate_up_ptr, out_ptr, inner, BLOCK: tl.constexpr):
    """out = silu(gate) * up for gate_up [n, 2 * inner], each rounded as F.silu and then the product are."""
    row = tl.program_id(0).to(tl.int64)  # offsets in 64 bits: a pool of many long rows passes 2**31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < inner
    gate = tl.load(gate_up_ptr + row * 2 * inner + cols, mask=inside, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * inner + inner + cols, mask=inside, other=0.0)
    g = gate.to(tl.float32)
    act = _round(tl.div_rn(g, 1.0 + _exp(-g)), gate.dtype)
    tl.store(out_ptr + row * inner + cols, _round(act.to(tl.float32) * up.to(tl.float32), gate.dtype), mask=inside)


def add_rms_norm(
    residual: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual + delta, weight * rms_norm(residual + delta)), rounded as eager rounds each; [n, hidden] each."""
    n, hidden = residual.shape
    out = torch.empty_like(residual)
    summed = torch.empty_like(residual) if delta is not None else residual
    block = triton.next_power_of_2(hidden)
    _add_rms_norm[(n,)](
        delta if delta is not None else residual,
        residual,
        weight,
        summed,
        out,
        hidden,
        eps,
        ADD=delta is not None,
        BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )
    return summed, out


def _layout(kv_pool: torch.Tensor, tables: torch.Tensor | None, positions: torch.Tensor) -> tuple:
    """(kv_heads, positions a row can hold, the kernels' table arguments (pointer and width; ``positions`` stands in
    where there is none), strides as they take them: row or page, key/value, head, position or slot, and the page
    size or 0) of a pool [n, key/value, kv_heads, max_length, dim] or, with ``tables`` [n, width] of page ids, of one
    block's pages [pages, page_size, key/value, kv_heads, dim]."""
    if tables is None:
        return kv_pool.shape[2], kv_pool.shape[3], (positions, 0), kv_pool.stride()[:4], 0
    page, slot, kv, head = kv_pool.stride()[:4]
    page_size = kv_pool.shape[1]
    width = tables.shape[1]
    return kv_pool.shape[3], width * page_size, (tables, width), (page, kv, head, slot), page_size


def rope_write(
    qkv: torch.Tensor, cos_table, sin_table, positions, kv_pool: torch.Tensor, tables: torch.Tensor | None = None
) -> None:
    """RoPE on qkv [n, heads + 2 * kv_heads, dim]'s queries and keys (queries in place), keys and values into
    ``kv_pool`` [n, key/value, kv_heads, max_length, dim] (any strides, the last dimension contiguous) at each row's
    position, or into the pages of ``tables`` (``_layout``)."""
    n, total, dim = qkv.shape
    kv_heads, _, table_args, strides, page_size = _layout(kv_pool, tables, positions)
    heads = total - 2 * kv_heads
    _rope_write[(n, heads + kv_heads)](
        qkv,
        cos_table,
        sin_table,
        positions,
        kv_pool,
        *table_args,
        *strides,
        heads=heads,
        kv_heads=kv_heads,
        DIM=dim,
        PAGE=page_size,
    )


def attention(
    qkv: torch.Tensor, positions: torch.Tensor, kv_pool: torch.Tensor, scale: float, tables: torch.Tensor | None = None
) -> torch.Tensor:
    """[n, heads * dim]: each row's rotated query heads (in qkv) over its cache's positions up to its own (a pool,
    or pages as in ``rope_write``)."""
    n, total, dim = qkv.shape
    kv_heads, max_length, table_args, strides, page_size = _layout(kv_pool, tables, positions)
    heads = total - 2 * kv_heads
    out = torch.empty(n, heads, dim, device=qkv.device, dtype=qkv.dtype)
    splits = triton.cdiv(max_length, ATTENTION_CHUNK)
    partial = stats = out
    if splits > 1:
        partial = torch.empty(n * heads * splits, dim, device=qkv.device, dtype=torch.float32)
        stats = torch.empty(n * heads * splits, 2, device=qkv.device, dtype=torch.float32)
    _attention[(n, heads, splits)](
        qkv,
        positions,
        kv_pool,
        *table_args,
        out,
        partial,
        stats,
        *strides,
        scale,
        ATTENTION_CHUNK,
        splits,
        heads=heads,
        kv_heads=kv_heads,
        DIM=dim,
        TILE=32,
        PAGE=page_size,
        num_warps=4,
    )
    if splits > 1:
        _combine[(n * heads,)](partial, stats, out, splits, DIM=dim, num_warps=4)
    return out.view(n, heads * dim)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    n, width = gate_up.shape
    inner = width // 2
    out = torch.empty(n, inner, device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul[(n, triton.cdiv(inner, block))](gate_up, out, inner, BLOCK=block, num_warps=4)
    return out
