"""The graph-safe decode step of Llama blocks: one token of each session, shapes independent of the positions.

The node records it as a CUDA graph per round composition and replays it (``nectar.node.graphs``): positions are a
device tensor, RoPE rows come from the precomputed tables, keys/values are written with ``index_copy_`` (or one
indexed write into pooled caches) and each session attends over its whole preallocated cache under a mask of the
positions not yet written. No host syncs, so it records as is. ``paged_decode_step`` is the same step over a page
pool, whose recording serves any sessions (``PagedDecoder``).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from nectar.models.families.llama.fused import FusedLayer, FusedLlamaBlocks
from nectar.settings import current

logger = logging.getLogger(__name__)

# ``current().decode_route`` (NECTAR_DECODE_ROUTE): "triton" (the default since stop 37's H100 checks: its recorded
# rounds against eager's, and honest nodes' audit scores on this route), a block's norms, RoPE, cache writes,
# attention and SwiGLU in five Triton kernels (``triton_decode``); "compiled", norms, products, RoPE and SwiGLU
# through torch.compile; "eager", PyTorch's kernels one by one


def static_decode_step(
    blocks: FusedLlamaBlocks,
    x: torch.Tensor,
    positions: torch.Tensor,
    caches: list,
    first_block: int,
    pools: list | None = None,
) -> torch.Tensor:
    """``BatchRunner.static_step`` for Llama blocks: ``x`` [n, hidden], ``positions`` [n], ``caches[i]`` session
    i's SpanCaches (one per block); ``pools``: the same caches as one tensor per block."""
    if getattr(blocks, "fused", False):  # chosen at load (``fuses``)
        if pools is not None:
            kv_pools = pools  # [n, key/value, kv_heads, max_length, head_dim] per block
        else:  # per block, each session's buffer [key/value, 1, kv_heads, max_length, head_dim] as a pool of one
            kv_pools = [
                [session[local].buffer[0].transpose(0, 1) for session in caches] for local in range(len(caches[0]))
            ]
            if len(caches) == 1:
                kv_pools = [own[0] for own in kv_pools]
        try:
            return _through_blocks_fused(blocks, x, positions, first_block, len(caches[0]), kv_pools)
        except Exception as error:
            _unfuse(blocks, error)
    attend = (
        _pooled_attention(blocks, positions, pools) if pools is not None else _own_attention(blocks, positions, caches)
    )
    return _through_blocks(blocks, x, positions, first_block, len(caches[0]), attend)


def paged_decode_step(
    blocks: FusedLlamaBlocks,
    x: torch.Tensor,
    positions: torch.Tensor,
    tables: torch.Tensor,
    storage: torch.Tensor,
    first_block: int,
    num_blocks: int,
) -> torch.Tensor:
    """``BatchRunner.paged_step`` for Llama blocks: the decode step over a page pool (``nectar.models.paged``).

    Shapes depend only on the number of rows and the table width, never on which sessions the rows are, so one
    recording serves any sessions that fit. Per block: one ``index_copy_`` of every row's new key/value into its
    slot (table[position // page_size] * page_size + position % page_size), a gather of every row's ``width`` pages
    (a copy of n * width * page_size keys and values: the price of the fixed shape, growing with the width the node
    chose for the round, not with the pool) and one masked attention call. On the Triton route (``fuses``) the
    kernels write and read the pages through the tables instead: no gather, no mask, the same values as its rounds
    over a session's own cache."""
    n, heads, kv_heads, dim = x.shape[0], blocks.num_heads, blocks.num_kv_heads, blocks.head_dim
    page_size, width = storage.shape[2], tables.shape[1]
    if getattr(blocks, "fused", False):  # the Triton kernels read and write the pages through the tables
        try:
            pages = [(storage[first_block + local], tables) for local in range(num_blocks)]
            return _through_blocks_fused(blocks, x, positions, first_block, num_blocks, pages)
        except Exception as error:
            _unfuse(blocks, error)
    page = tables.gather(1, torch.div(positions, page_size, rounding_mode="floor")[:, None])[:, 0]
    slots = page * page_size + positions % page_size
    mask = _mask(blocks, positions, width * page_size)

    def attend(local: int, qkv: torch.Tensor) -> torch.Tensor:
        pool = storage[first_block + local]  # [pages, page_size, key/value, kv_heads, head_dim]
        pool.view(-1, 2, kv_heads, dim).index_copy_(0, slots, qkv[:, heads:].reshape(n, 2, kv_heads, dim))
        gathered = pool[tables].view(n, width * page_size, 2, kv_heads, dim)
        keys, values = gathered[:, :, 0].transpose(1, 2), gathered[:, :, 1].transpose(1, 2)  # [n, kv_heads, L, d]
        if heads != kv_heads:
            keys = keys.repeat_interleave(heads // kv_heads, dim=1)
            values = values.repeat_interleave(heads // kv_heads, dim=1)
        query = qkv[:, :heads].unsqueeze(2)  # [n, heads, 1, head_dim]
        attention = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=blocks.scaling)
        return attention.reshape(n, heads * dim)

    return _through_blocks(blocks, x, positions, first_block, num_blocks, attend)


def _through_blocks(blocks: FusedLlamaBlocks, x, positions, first_block: int, num_blocks: int, attend):
    """``x`` through blocks [first_block, first_block + num_blocks), each block's attention by ``attend``."""
    cos = blocks.cos_table.index_select(0, positions)[:, None]  # [n, 1, head_dim]
    sin = blocks.signed_sin_table.index_select(0, positions)[:, None]
    compiled = compiled_parts(x.shape[0]) if compiles(blocks) else None
    for local in range(num_blocks):
        layer = blocks.layers[first_block + local]
        if compiled is None:
            x = blocks.mlp(layer, x, attend(local, blocks.qkv(layer, x, cos, sin)))
            continue
        pre, post = compiled
        heads, kv_heads = blocks.num_heads, blocks.num_kv_heads
        qkv = pre(x, layer.input_norm.weight, layer.qkv_weight, cos, sin, heads, kv_heads, layer.input_norm.eps)
        out = attend(local, qkv)
        x = post(
            x, out, layer.o_weight, layer.post_norm.weight, layer.gate_up_weight, layer.down_weight, layer.post_norm.eps
        )
    return x


def _through_blocks_fused(blocks: FusedLlamaBlocks, x, positions, first_block: int, num_blocks: int, kv_pools):
    """``_through_blocks`` in Triton kernels (``triton_decode``): per block the three products and five kernels,
    each residual add fused with the norm that follows it."""
    from nectar.models.families.llama import triton_decode as kernels

    n, heads, kv_heads = x.shape[0], blocks.num_heads, blocks.num_kv_heads
    residual, delta = x, None
    for local in range(num_blocks):
        layer = blocks.layers[first_block + local]
        residual, normed = kernels.add_rms_norm(residual, layer.input_norm.weight, layer.input_norm.eps, delta)
        if layer.quantized:  # nf4: the layers' own products (bitsandbytes'), the rest in the kernels
            qkv = torch.cat([linear(normed) for linear in layer.qkv_linears], dim=-1)
        else:
            qkv = normed @ layer.qkv_weight
        qkv = qkv.view(n, heads + 2 * kv_heads, blocks.head_dim)
        pool = kv_pools[local]
        if isinstance(pool, tuple):  # a block's pages and the rows' page tables (``paged_decode_step``)
            pages, tables = pool
            kernels.rope_write(qkv, blocks.cos_table, blocks.signed_sin_table, positions, pages, tables)
            attention = kernels.attention(qkv, positions, pages, blocks.scaling, tables)
        elif isinstance(pool, torch.Tensor):
            kernels.rope_write(qkv, blocks.cos_table, blocks.signed_sin_table, positions, pool)
            attention = kernels.attention(qkv, positions, pool, blocks.scaling)
        else:  # sessions with caches of different lengths, each its own buffer: their own launches
            outputs = []
            for row, own in enumerate(pool):
                kernels.rope_write(
                    qkv[row : row + 1], blocks.cos_table, blocks.signed_sin_table, positions[row : row + 1], own
                )
                outputs.append(kernels.attention(qkv[row : row + 1], positions[row : row + 1], own, blocks.scaling))
            attention = torch.cat(outputs)
        if layer.quantized:
            projected = layer.o_proj(attention)
            residual, normed = kernels.add_rms_norm(residual, layer.post_norm.weight, layer.post_norm.eps, projected)
            gate_up = torch.cat([layer.gate_proj(normed), layer.up_proj(normed)], dim=-1)
            delta = layer.down_proj(kernels.silu_mul(gate_up))
            continue
        residual, normed = kernels.add_rms_norm(
            residual, layer.post_norm.weight, layer.post_norm.eps, attention @ layer.o_weight
        )
        delta = kernels.silu_mul(normed @ layer.gate_up_weight) @ layer.down_weight
    return delta + residual


def _unfuse(blocks: FusedLlamaBlocks, error: Exception) -> None:
    """Triton could not build a kernel for this GPU: PyTorch's kernels from now on. Any other error is the round's."""
    if not type(error).__module__.startswith("triton"):
        raise error
    blocks.fused, blocks.fused_error = False, f"{type(error).__name__}: {str(error)[:300]}"
    logger.warning(f"The Triton decode kernels failed ({blocks.fused_error}); decode rounds use PyTorch's")


@torch.inference_mode()
def warm_up_fused(blocks: FusedLlamaBlocks) -> None:
    """Builds the Triton kernels at load, one attention chunk and several, instead of in the first client's first
    round (3.8 s on an H100, stop 36). The chunk count is a runtime argument, so no cache length builds again."""
    from nectar.models.families.llama import triton_decode as kernels

    x = torch.zeros(1, blocks.hidden_size, device=blocks.device, dtype=blocks.dtype)
    positions = torch.zeros(1, dtype=torch.long, device=blocks.device)
    try:
        for length in (1, kernels.ATTENTION_CHUNK + 1):
            pool = torch.zeros(
                1, 2, blocks.num_kv_heads, length, blocks.head_dim, device=blocks.device, dtype=blocks.dtype
            )
            _through_blocks_fused(blocks, x, positions, 0, 1, [pool])
    except Exception as error:
        _unfuse(blocks, error)
    if blocks.on_gpu:
        torch.cuda.synchronize(blocks.device)


def fuses(blocks: FusedLlamaBlocks) -> bool:
    """The Triton route (``triton_decode``): asked for (the default), on a GPU (or Triton's CPU interpreter), in
    float16 or bfloat16, for plain Llama layers whose head size is a power of two."""
    if current().decode_route != "triton":
        return False
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (blocks.on_gpu or interpreted) or blocks.dtype not in (torch.float16, torch.bfloat16):
        return False
    if blocks.cos_table is None or blocks.cos_table.shape[-1] != blocks.head_dim:  # RoPE over whole heads only
        return False
    if blocks.head_dim & (blocks.head_dim - 1):
        return False
    if not all(_plain(layer, nf4=blocks.quantization == "nf4") for layer in blocks.layers):
        return False
    return _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compiles(blocks: FusedLlamaBlocks) -> bool:
    """The compiled route: asked for, on a GPU, and for plain Llama layers (no biases, head norms or other act)."""
    if current().decode_route != "compiled" or not blocks.on_gpu:
        return False
    return all(_plain(layer) for layer in blocks.layers)


def _plain(layer: FusedLayer, *, nf4: bool = False) -> bool:
    """No biases, head norms or other activation; quantized layers only where ``nf4`` (the Triton route calls
    their own products; the compiled functions multiply fused float matrices)."""
    if layer.quantized:
        if not nf4:
            return False
        linears = (*layer.qkv_linears, layer.o_proj, layer.gate_proj, layer.up_proj, layer.down_proj)
        biases = tuple(getattr(getattr(m, "linear", m), "bias", None) for m in linears)  # NF4Rows wraps the layer
    else:
        biases = (layer.qkv_bias, layer.o_bias, layer.gate_up_bias, layer.down_bias)
    return all(b is None for b in biases) and layer.q_norm is None and layer.act is F.silu


_COMPILED: dict[bool, tuple] = {}


def compiled_parts(rows: int) -> tuple:
    """(pre, post) compiled for one row (shapes fixed: the lone session's round) or any number of rows (one graph
    whose batch size is symbolic, so new round sizes do not compile again)."""
    many = rows > 1
    if many not in _COMPILED:
        dynamic, options = False if not many else None, rounding_options()
        pre = torch.compile(_pre_attention, fullgraph=True, dynamic=dynamic, options=options)
        post = torch.compile(_post_attention, fullgraph=True, dynamic=dynamic, options=options)
        if many:  # only the batch dimension is symbolic: every other size stays specialised, as for one row
            pre, post = _batch_dynamic(pre, (0, 3, 4)), _batch_dynamic(post, (0, 1))
        _COMPILED[many] = (pre, post)
    return _COMPILED[many]


def rounding_options() -> dict:
    """Inductor options under which the compiled functions round as the eager route does, bit for bit: every
    intermediate rounded to its dtype where eager rounds it (Inductor otherwise keeps fused intermediates in
    float32), and no product fused with the residual add that follows it (``addmm`` rounds once where eager rounds
    the product, then the sum). Audits score a node against a verifier that rounds as transformers does (stop 33: on a
    CPU, without these 58% of a bfloat16 RoPE output's values and 65% of an MLP's differed from eager)."""
    import torch._inductor.config as inductor_config

    wanted = {"emulate_precision_casts": True, "pattern_matcher": False}
    return {name: value for name, value in wanted.items() if hasattr(inductor_config, name)}


def _batch_dynamic(compiled, rows: tuple[int, ...]):
    """``compiled`` with dimension 0 of the arguments at ``rows`` (the tensors with a row per session) symbolic."""

    def call(*args):
        for index in rows:
            torch._dynamo.mark_dynamic(args[index], 0)
        return compiled(*args)

    return call


@torch.inference_mode()
def warm_up(blocks: FusedLlamaBlocks) -> None:
    """Compiles both variants at load (tens of seconds once; cached on disk after), not in a client's first step.

    Under inference mode and with arguments made as rounds make them: dynamo guards on both (a view of a table made
    outside inference mode is another tensor to it), so the warm-up used to be compiled again in the first round of
    each variant (likely the 0.24 s and 1.3 s "recordings" of the compiled route on an H100, stop 33)."""
    layer = blocks.layers[0]
    for rows in (1, 2):
        pre, post = compiled_parts(rows)
        x = torch.zeros(rows, blocks.hidden_size, device=blocks.device, dtype=blocks.dtype)
        positions = torch.arange(rows, device=blocks.device)  # table rows, indexed as rounds index them
        cos = blocks.cos_table.index_select(0, positions)[:, None]
        sin = blocks.signed_sin_table.index_select(0, positions)[:, None]
        heads, kv_heads = blocks.num_heads, blocks.num_kv_heads
        qkv = pre(x, layer.input_norm.weight, layer.qkv_weight, cos, sin, heads, kv_heads, layer.input_norm.eps)
        out = qkv[:, :heads].reshape(rows, -1).contiguous()
        post(
            x, out, layer.o_weight, layer.post_norm.weight, layer.gate_up_weight, layer.down_weight, layer.post_norm.eps
        )
    if blocks.on_gpu:
        torch.cuda.synchronize(blocks.device)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    upcast = x.float()
    return weight * (upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _pre_attention(x, norm_weight, qkv_weight, cos, sin, heads: int, kv_heads: int, eps: float) -> torch.Tensor:
    """``FusedLlamaBlocks.qkv`` as one function of tensors (one compiled graph serves every block)."""
    qkv = (_rms(x, norm_weight, eps) @ qkv_weight).view(x.shape[0], heads + 2 * kv_heads, -1)
    qk = qkv[:, : heads + kv_heads]
    rotated = qk * cos + qk.roll(qk.shape[-1] // 2, dims=-1) * sin
    return torch.cat((rotated, qkv[:, heads + kv_heads :]), dim=1)


def _post_attention(x, attention, o_weight, norm_weight, gate_up_weight, down_weight, eps: float) -> torch.Tensor:
    """``FusedLlamaBlocks.mlp`` as one function of tensors."""
    x = attention @ o_weight + x
    gate, up = (_rms(x, norm_weight, eps) @ gate_up_weight).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down_weight + x


def _mask(blocks: FusedLlamaBlocks, positions: torch.Tensor, max_length: int) -> torch.Tensor:
    """[k, 1, 1, max_length] for ``positions`` [k]: each row sees its cache up to its own position (built on the
    device, so it records into a graph without a host sync)."""
    mask = torch.zeros(positions.shape[0], 1, 1, max_length, dtype=blocks.dtype, device=blocks.device)
    later = torch.arange(max_length, device=blocks.device) > positions[:, None]
    return mask.masked_fill_(later[:, None, None, :], torch.finfo(blocks.dtype).min)


def _own_attention(blocks: FusedLlamaBlocks, positions: torch.Tensor, caches: list):
    """``attend(block, qkv)`` -> [n, heads * head_dim] over each session's own buffer: one write and one
    attention call per session and block."""
    n, heads, kv_heads, dim = positions.shape[0], blocks.num_heads, blocks.num_kv_heads, blocks.head_dim
    groups = heads // kv_heads
    where = [positions[index : index + 1] for index in range(n)]
    masks = [_mask(blocks, position, session[0].max_length) for position, session in zip(where, caches)]

    def attend(local: int, qkv: torch.Tensor) -> torch.Tensor:
        outputs = []
        for index, session in enumerate(caches):
            buffer = session[local].buffer[0]  # [key/value, 1, kv_heads, max_length, head_dim]
            new_kv = qkv[index : index + 1, heads:].view(1, 1, 2, kv_heads, dim).permute(2, 0, 3, 1, 4)
            buffer.index_copy_(3, where[index], new_kv)
            keys, values = buffer[0], buffer[1]
            if groups > 1:
                keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            query = qkv[index : index + 1, :heads].view(1, 1, heads, dim).transpose(1, 2)
            outputs.append(
                F.scaled_dot_product_attention(query, keys, values, attn_mask=masks[index], scale=blocks.scaling)
            )
        attention = outputs[0] if n == 1 else torch.cat(outputs)  # [n, heads, 1, dim]
        return attention.transpose(1, 2).reshape(n, heads * dim)

    return attend


def _pooled_attention(blocks: FusedLlamaBlocks, positions: torch.Tensor, pools: list):
    """``attend(block, qkv)`` -> [n, heads * head_dim] over pooled caches: one write of all new keys/values and
    one attention call per block."""
    n, heads, kv_heads, dim = positions.shape[0], blocks.num_heads, blocks.num_kv_heads, blocks.head_dim
    max_length = pools[0].shape[3]
    rows = torch.arange(n, device=blocks.device)
    mask = _mask(blocks, positions, max_length)

    def attend(local: int, qkv: torch.Tensor) -> torch.Tensor:
        pool = pools[local]  # [n, key/value, kv_heads, max_length, head_dim]
        pool[rows, :, :, positions] = qkv[:, heads:].view(n, 2, kv_heads, dim)
        keys, values = pool[:, 0], pool[:, 1]
        if heads != kv_heads:
            keys = keys.repeat_interleave(heads // kv_heads, dim=1)
            values = values.repeat_interleave(heads // kv_heads, dim=1)
        query = qkv[:, :heads].unsqueeze(2)  # [n, heads, 1, head_dim]
        attention = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=blocks.scaling)
        return attention.reshape(n, heads * dim)

    return attend
