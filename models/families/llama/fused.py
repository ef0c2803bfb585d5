"""A node's Llama blocks with fused weights, and the per-token maths every fast route shares.

``FusedLlamaBlocks`` fuses each block's Q/K/V and gate/up weights into one [in, out] matrix (the modules' own
parameters become views of it, so the generic path, forward/backward with autograd, keeps working and no memory is
duplicated), computes the RoPE tables once, and picks the CPU products' library (``CpuMatmul``). Its routes: the
batched eager forward (``batching.py``), the graph-safe decode step (``graphs.py``) and the C decode layer
(``native_decode.py``). They reproduce transformers' decoder layer operation for operation (same RMSNorm casts, rotary
table, SDPA call), so their outputs equal transformers' to float32 rounding (tests/speed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nectar.models.cpu_blas import CpuMatmul
from nectar.models.fast_path import BatchRunner
from nectar.models.layout import store_in_out
from nectar.models.quant import NF4Rows, NF4Scratch, nf4_on_gpu

logger = logging.getLogger(__name__)

MAX_ROTARY_TABLE_BYTES = 64 << 20


class FusedLlamaBlocks(BatchRunner):
    """The fused layers, head shapes, RoPE tables and products of a node's Llama blocks (one single-block
    ``BlockSpan`` per block); ``LlamaBatchRunner`` adds the routes."""

    def __init__(self, spans: Sequence[nn.Module]):
        self.spans = list(spans)
        first = self.spans[0]
        self.device, self.dtype, self.hidden_size = first.device, first.dtype, first.hidden_size
        attention = first.blocks[0].self_attn
        self.head_dim = attention.head_dim
        self.num_heads = first.config.num_attention_heads
        self.num_kv_heads = getattr(first.config, "num_key_value_heads", None) or self.num_heads
        self.scaling = attention.scaling
        self.rotary = first.runner.rotary
        self.quantization = getattr(first, "quantization", "none")
        self.quantized = self.quantization != "none"
        self.scratch = _nf4_scratch(self.spans, self.dtype, first.device) if self.quantization == "nf4" else None
        self.layers = [
            FusedLayer(span.blocks[0], quantized=self.quantized, scratch=self.scratch) for span in self.spans
        ]
        self.on_gpu = first.device.type == "cuda"
        self.matmul = CpuMatmul()  # PyTorch's products; on CPU in float32, the faster BLAS per row count
        if first.device.type == "cpu" and first.dtype == torch.float32 and not self.quantized:
            self.matmul = CpuMatmul.calibrate([w for layer in self.layers for w in layer.matrices])
        self.cos_table, self.signed_sin_table = rotary_tables(self.rotary, first)

    @property
    def static_positions(self) -> int:
        """A graph-safe step indexes the RoPE tables inside the graph: only where they exist."""
        return len(self.cos_table) if self.cos_table is not None else 0

    def kernels(self) -> contextlib.AbstractContextManager:
        return attention_backends(self.on_gpu)

    def rotary_at(self, x: torch.Tensor, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [N, 1, head_dim] for ``positions`` [N] (all below ``end``), broadcast over heads: rows of
        the tables built at load where they reach, else from the rotary module (``rope_in_place`` takes them)."""
        if self.cos_table is not None and end <= len(self.cos_table):
            cos = self.cos_table.index_select(0, positions)[:, None]
            sin = self.signed_sin_table.index_select(0, positions)[:, None]
            return cos, sin
        cos, sin = self.rotary(x[None], positions[None])
        return cos[0, :, None], signed_sin(sin[0, :, None])

    def qkv(self, layer: FusedLayer, x, cos, sin) -> torch.Tensor:
        """[n, heads + 2 * kv_heads, head_dim]: queries and keys rotated (RoPE), then values, side by side."""
        n, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        if layer.quantized:
            normed = layer.input_norm(x)
            qkv = torch.cat([linear(normed) for linear in layer.qkv_linears], dim=-1).view(n, heads + 2 * kv_heads, -1)
        else:
            qkv = self.matmul(layer.input_norm(x), layer.qkv_weight, layer.qkv_bias).view(n, heads + 2 * kv_heads, -1)
        if layer.q_norm is not None:  # Qwen3: each query and key head normalised before RoPE
            qkv[:, :heads] = layer.q_norm(qkv[:, :heads])
            qkv[:, heads : heads + kv_heads] = layer.k_norm(qkv[:, heads : heads + kv_heads])
        rope_in_place(qkv[:, : heads + kv_heads], cos, sin)
        return qkv

    def mlp(self, layer: FusedLayer, x, attention) -> torch.Tensor:
        """The attention's output projection and residual, then the MLP and its residual."""
        if layer.quantized:  # the block's own linears, as its generic forward calls them
            x = layer.o_proj(attention).add_(x)
            normed = layer.post_norm(x)
            return layer.down_proj(layer.act(layer.gate_proj(normed)).mul_(layer.up_proj(normed))).add_(x)
        x = self.matmul(attention, layer.o_weight, layer.o_bias).add_(x)  # the residual, into the fresh product
        gate_up = self.matmul(layer.post_norm(x), layer.gate_up_weight, layer.gate_up_bias)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.matmul(layer.act(gate).mul_(up), layer.down_weight, layer.down_bias).add_(x)


def _block_linears(block: nn.Module) -> tuple[nn.Module, ...]:
    """A Llama block's seven linears: q, k, v, o, gate, up, down."""
    attention, mlp = block.self_attn, block.mlp
    return (
        attention.q_proj,
        attention.k_proj,
        attention.v_proj,
        attention.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


def _nf4_scratch(spans: Sequence[nn.Module], dtype: torch.dtype, device: torch.device) -> NF4Scratch | None:
    """The span's shared dequantization scratch (``NF4Scratch``), where every linear is nf4 on a GPU."""
    linears = [linear for span in spans for linear in _block_linears(span.blocks[0])]
    if device.type != "cuda" or not all(nf4_on_gpu(m) for m in linears):
        return None
    return NF4Scratch(linears, dtype, device)


def attention_backends(on_gpu: bool):
    """On GPUs, SDPA without cuDNN: cuDNN builds a new plan for every key length, which a decode step changes each
    time (measured on an H100: 60 ms per call instead of 0.14 ms, benchmarks/gpu/sdpa_probe.py)."""
    if not on_gpu:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class FusedLayer:
    """One decoder layer's weights, fused for the fast routes (the module's parameters become views of these).

    Matrices are stored [in, out] (``x @ w``): MKL runs the small-batch products that batching produces 1.3-1.6x
    faster in this layout than with PyTorch's usual [out, in] weights, and single rows just as fast.

    ``quantized``: the block's linears are quantized (bitsandbytes ``Linear4bit``, ``Int8WeightLinear``); they are
    kept and called as they are (no fused matrices: fusing nf4 codes would regroup the double-quantized absmax, so
    the codes would no longer be the checkpoint's that audits recompute from), and the ``*_weight`` are None.
    """

    def __init__(self, block: nn.Module, *, quantized: bool = False, scratch: NF4Scratch | None = None):
        attention, mlp = block.self_attn, block.mlp
        self.quantized = quantized
        if quantized:
            # nf4 on a GPU: products of several rows dequantize into the span's one scratch matrix (``NF4Rows``)
            calls = [m if scratch is None else NF4Rows(m, scratch) for m in _block_linears(block)]
            self.qkv_linears = tuple(calls[:3])
            self.o_proj, self.gate_proj, self.up_proj, self.down_proj = calls[3:]
            self.qkv_weight = self.qkv_bias = self.gate_up_weight = self.gate_up_bias = None
            self.o_weight = self.o_bias = self.down_weight = self.down_bias = None
        else:
            self.qkv_weight, self.qkv_bias = _fuse(attention, ("q_proj", "k_proj", "v_proj"))
            self.gate_up_weight, self.gate_up_bias = _fuse(mlp, ("gate_proj", "up_proj"))
            self.o_weight, self.o_bias = store_in_out(attention.o_proj), attention.o_proj.bias
            self.down_weight, self.down_bias = store_in_out(mlp.down_proj), mlp.down_proj.bias
        # transformers' SiLU module only calls F.silu: called directly, a step skips a module call per block
        self.act = F.silu if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") else mlp.act_fn
        self.input_norm = RMSNorm(block.input_layernorm)
        self.post_norm = RMSNorm(block.post_attention_layernorm)
        # per-head norms of queries and keys (Qwen3), or None
        has_norms = hasattr(attention, "q_norm")
        self.q_norm = RMSNorm(attention.q_norm) if has_norms else None
        self.k_norm = RMSNorm(attention.k_norm) if has_norms else None

    @property
    def matrices(self) -> list[torch.Tensor]:
        """The [in, out] matrices in the order a step reads them (none for quantized layers)."""
        if self.quantized:
            return []
        return [self.qkv_weight, self.o_weight, self.gate_up_weight, self.down_weight]


def _fuse(module: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One [in, out] matrix for several linears; each linear's weight becomes a transposed view of its columns."""
    linears = [getattr(module, name) for name in names]
    with torch.no_grad():
        weight = torch.cat([linear.weight for linear in linears]).t().contiguous()
        bias = torch.cat([linear.bias for linear in linears]) if linears[0].bias is not None else None
    offset = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight = nn.Parameter(weight[:, offset : offset + rows].t(), requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias[offset : offset + rows], requires_grad=False)
        offset += rows
    return weight, bias


class RMSNorm:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, norm: nn.Module):
        self.weight = norm.weight
        self.eps = norm.variance_epsilon
        self.shape = tuple(norm.weight.shape)
        self.fused = norm.weight.dtype == torch.float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)  # one kernel; no casts to round in float32
        upcast = x.to(torch.float32)
        normed = upcast * torch.rsqrt(upcast.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_in_place(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """``qk = qk * cos + rotate_half(qk) * sin`` (transformers' RoPE), rounded as transformers rounds it: each
    product in ``qk``'s dtype, then their sum (``rotate_half(x) * sin`` is ``roll(x, half) * signed_sin``, the first
    half of sin negated). A fused multiply-add rounding once is closer to float32, but audits score a node against a
    verifier that rounds as transformers does: in bfloat16 and float16 it doubled the spread of honest nodes' audit
    scores (sd of log z 0.156 against 0.072 on a tiny Llama), past what the pooled test's threshold was set for."""
    rolled = qk.roll(qk.shape[-1] // 2, dims=-1).mul_(signed_sin)
    qk.mul_(cos).add_(rolled)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rotary_tables(rotary: nn.Module, span: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(cos, signed sin) [max_positions, head_dim] of a rotary embedding whose frequencies do not change with the
    sequence ("default" RoPE), computed once: a step then indexes rows instead of running the module's dozen small
    ops. (None, None) for other rotary types, or on a CPU where the tables would exceed ``MAX_ROTARY_TABLE_BYTES``
    (a GPU's recorded rounds need them: they index positions inside the graph)."""
    max_positions = int(getattr(span.config, "max_position_embeddings", 0) or 0)
    head_dim = span.blocks[0].self_attn.head_dim
    table_bytes = 2 * max_positions * head_dim * span.dtype.itemsize
    too_large = span.device.type == "cpu" and table_bytes > MAX_ROTARY_TABLE_BYTES
    if getattr(rotary, "rope_type", "default") != "default" or max_positions <= 0 or too_large:
        return None, None
    with torch.inference_mode():
        positions = torch.arange(max_positions, device=span.device)
        cos, sin = rotary(torch.zeros(1, 1, device=span.device, dtype=span.dtype), positions[None])
    return cos[0], signed_sin(sin[0])
