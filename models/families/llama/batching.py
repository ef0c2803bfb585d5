"""Continuous batching of inference steps: many sessions' new tokens go through a span in one forward.

``InferenceTask`` is what the handler submits for one session's step; the compute thread (``task_pool``) gathers
the tasks that are pending at once and hands each group to ``SpanBackend.run_inference``. Sessions keep their own
``SpanCache`` (their own slots): a batch may mix prefills and decodes at any lengths and positions.

``LlamaBatchRunner`` is the lean batched forward for Llama-architecture blocks: every token of every session goes
through one fused QKV, output, gate/up and down projection per block (rows stacked), RoPE at each row's absolute
position, and attention per session against its own cache (a view, no copy). It reproduces transformers' decoder
layer operation for operation (same RMSNorm casts, rotary table, SDPA call), so a batched step equals the
unbatched one to float32 rounding (tests/speed). Other families, prompt-tuned first steps and sliding windows take
the generic path (``BlockSpan.forward``, one session at a time).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nectar.models.attention import AttentionStep
from nectar.models.cpu_blas import CpuMatmul
from nectar.models.errors import CacheError
from nectar.models.layout import store_in_out
from nectar.models.families.llama.native_decode import NativeDecoder

if TYPE_CHECKING:
    from nectar.node.backend import SpanBackend

logger = logging.getLogger(__name__)


@dataclass
class InferenceTask:
    """One session's step, as the handler submits it: [B, T, H] new tokens at ``position`` through [start, end).

    Callable on its own (an unbatched step); the compute thread batches tasks whose ``batch_key`` is equal.
    """

    backend: "SpanBackend"
    hidden: torch.Tensor
    caches: list
    start: int
    end: int
    position: int
    prompts: Optional[torch.Tensor] = None

    @property
    def tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    @property
    def session(self) -> int:
        return id(self.caches[0])

    @property
    def batch_key(self) -> Optional[tuple]:
        """Tasks with equal keys may share a forward; None = run alone (deep prompts on the first step)."""
        if self.prompts is not None and self.position == 0:
            return None
        return id(self.backend), self.start, self.end

    @property
    def announces_start(self) -> bool:
        """On an accelerator the backend says when the round's kernels are queued (``announce_round_started``)."""
        return self.backend.device.type != "cpu"

    def __call__(self) -> torch.Tensor:
        return self.backend.run_inference([self])[0]

    @staticmethod
    def run_batch(tasks: Sequence["InferenceTask"]) -> list[torch.Tensor]:
        return tasks[0].backend.run_inference(tasks)


class LlamaBatchRunner:
    """Batched inference through a node's Llama blocks (one single-block ``BlockSpan`` per block).

    Built by ``SpanBackend`` when ``supports`` says the blocks qualify. Fuses each block's Q/K/V and gate/up weights
    into one matrix; the modules' own parameters become views of it, so the generic path (forward/backward with
    autograd) keeps working and no memory is duplicated.
    """

    def __init__(self, spans: Sequence[nn.Module]):
        self.spans = list(spans)
        first = self.spans[0]
        attention = first.blocks[0].self_attn
        self.head_dim = attention.head_dim
        self.num_heads = first.config.num_attention_heads
        self.num_kv_heads = getattr(first.config, "num_key_value_heads", None) or self.num_heads
        self.scaling = attention.scaling
        self.rotary = first.runner.rotary
        self.layers = [_FusedLlamaLayer(span.blocks[0]) for span in self.spans]
        self.on_gpu = first.device.type == "cuda"
        self.matmul = CpuMatmul()  # PyTorch's products; on CPU in float32, the faster BLAS per row count
        if first.device.type == "cpu" and first.dtype == torch.float32:
            self.matmul = CpuMatmul.calibrate([w for layer in self.layers for w in layer.matrices])
        self.cos_table, self.signed_sin_table = _rotary_tables(self.rotary, first)
        self.graphs = None
        if self.on_gpu:
            from nectar.node.graphs import GraphedDecoder

            self.graphs = GraphedDecoder(self)
        self.native: Optional[NativeDecoder] = None
        self.native = NativeDecoder.build(self)  # one session's decode step in C on CPUs, where it measured faster

    @staticmethod
    def supports(spans: Sequence[nn.Module]) -> bool:
        for span in spans:
            if span.family.name != "llama" or span.num_blocks != 1 or span.runner.sliding_window is not None:
                return False
            block = span.blocks[0]
            if not all(hasattr(block, name) for name in ("self_attn", "mlp", "input_layernorm",
                                                           "post_attention_layernorm")):
                return False
        return True

    @torch.inference_mode()
    def run(self, tasks: Sequence[InferenceTask], first_block: int) -> list[torch.Tensor]:
        """Runs every task through blocks [start, end) (local indices from ``first_block``); returns [B, T, H] each."""
        if self.graphs is not None and self.graphs.applies(tasks):
            try:
                outputs = self.graphs.run(tasks, first_block)
            except Exception:
                logger.warning("CUDA graph decode failed; continuing without graphs", exc_info=True)
                self.graphs, outputs = None, None
            if outputs is not None:
                return outputs
        device, dtype = self.spans[0].device, self.spans[0].dtype
        hidden_size = self.spans[0].hidden_size
        lengths = [task.caches[0].length for task in tasks]
        for task, length in zip(tasks, lengths):
            if length + task.hidden.shape[1] > task.caches[0].max_length:
                raise CacheError(f"step needs {length + task.hidden.shape[1]} cached tokens, the session holds "
                                 f"{task.caches[0].max_length}")
        if self.native is not None and self.native.applies(tasks):
            return [self.native.run(tasks[0], first_block)]
        rows = [task.hidden.to(device, dtype).reshape(-1, hidden_size) for task in tasks]
        x = rows[0] if len(rows) == 1 else torch.cat(rows)
        positions = torch.cat([
            torch.arange(length, length + task.hidden.shape[1], device=device).repeat(task.hidden.shape[0])
            for task, length in zip(tasks, lengths)
        ])
        end = max(length + task.hidden.shape[1] for task, length in zip(tasks, lengths))
        cos, sin = self.rotary_at(x, positions, end)
        groups = []
        offset = 0
        for task, length in zip(tasks, lengths):
            batch, tokens = task.hidden.shape[:2]
            step = AttentionStep(length, tokens)
            mask = None
            if step.needs_mask():
                mask = step.causal_mask(dtype=dtype, device=device)
            groups.append((offset, offset + batch * tokens, batch, tokens, length, mask))
            offset += batch * tokens
        decode_mask = None
        if len(groups) > 1 and all(g[2] == 1 and g[3] == 1 for g in groups):
            # a decode round: one padded attention per block; positions (on the device) are the cache lengths,
            # so the mask needs no host-to-device copy (which would stall a GPU once per block)
            longest = max(lengths) + 1
            decode_mask = (torch.arange(longest, device=device)[None, :] <= positions[:, None])[:, None, None, :]
        num_blocks = tasks[0].end - tasks[0].start
        with _attention_backends(self.on_gpu):
            for local in range(num_blocks):
                layer = self.layers[first_block + local]
                caches = [task.caches[local] for task in tasks]
                x = self._block(layer, x, cos, sin, groups, caches, decode_mask)
        for task, (_, _, _, tokens, length, _) in zip(tasks, groups):
            for cache in task.caches:
                cache.length = length + tokens
        if self.graphs is not None:
            self.graphs.note_sessions(tasks, first_block)
        return [x[begin:end].view(batch, tokens, hidden_size)
                for begin, end, batch, tokens, _, _ in groups]

    def rotary_at(self, x: torch.Tensor, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin) [N, 1, head_dim] for ``positions`` [N] (all below ``end``), broadcast over heads: rows of
        the tables built at load where they reach, else from the rotary module (``_rope_in_place`` takes them)."""
        if self.cos_table is not None and end <= len(self.cos_table):
            cos = self.cos_table.index_select(0, positions)[:, None]
            signed_sin = self.signed_sin_table.index_select(0, positions)[:, None]
            return cos, signed_sin
        cos, sin = self.rotary(x[None], positions[None])
        return cos[0, :, None], _signed_sin(sin[0, :, None])

    def _block(self, layer: "_FusedLlamaLayer", x, cos, sin, groups, caches, decode_mask=None) -> torch.Tensor:
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self._qkv(layer, x, cos, sin)
        q, kv = qkv[:, :heads], qkv[:, heads:]
        if decode_mask is not None:
            return self._mlp(layer, x, self._decode_attention(q, kv, groups, caches, decode_mask))
        outputs = []
        for (begin, end, batch, tokens, length, mask), cache in zip(groups, caches):
            buffer = cache.buffer[0]  # [key/value, batch, kv_heads, max_length, head_dim]
            new_kv = kv[begin:end].view(batch, tokens, 2, kv_heads, dim).permute(2, 0, 3, 1, 4)
            buffer[:, :, :, length : length + tokens].copy_(new_kv)  # keys and values in one copy
            keys, values = buffer[0, :, :, : length + tokens], buffer[1, :, :, : length + tokens]
            query = q[begin:end].view(batch, tokens, heads, dim).transpose(1, 2)
            outputs.append(self._attention(query, keys, values, mask, tokens))
        attention = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return self._mlp(layer, x, attention)

    def _qkv(self, layer: "_FusedLlamaLayer", x, cos, sin) -> torch.Tensor:
        """[n, heads + 2 * kv_heads, head_dim]: queries and keys rotated (RoPE), then values, side by side."""
        n, heads, kv_heads = x.shape[0], self.num_heads, self.num_kv_heads
        qkv = self.matmul(layer.input_norm(x), layer.qkv_weight, layer.qkv_bias).view(n, heads + 2 * kv_heads, -1)
        _rope_in_place(qkv[:, : heads + kv_heads], cos, sin)
        return qkv

    def _mlp(self, layer: "_FusedLlamaLayer", x, attention) -> torch.Tensor:
        """The attention's output projection and residual, then the MLP and its residual."""
        x = self.matmul(attention, layer.o_weight, layer.o_bias).add_(x)  # the residual, into the fresh product
        gate_up = self.matmul(layer.post_norm(x), layer.gate_up_weight, layer.gate_up_bias)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.matmul(layer.act(gate).mul_(up), layer.down_weight, layer.down_bias).add_(x)

    def _decode_attention(self, q, kv, groups, caches, mask) -> torch.Tensor:
        """One new token for each of n sessions: a single masked SDPA over their caches padded to the longest.

        Per session only the cache write and a gather stay; the per-session SDPA calls (about ten small ops each,
        which dominate a batched decode round on CPU and in kernel launches on GPUs) become one.
        """
        n, heads, kv_heads, dim = q.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        new_kv = kv.view(n, 2, kv_heads, dim)
        keys, values = [], []
        for index, ((_, _, _, _, length, _), cache) in enumerate(zip(groups, caches)):
            buffer = cache.buffer[0]  # [key/value, batch, kv_heads, max_length, head_dim]
            buffer[:, 0, :, length].copy_(new_kv[index])
            keys.append(buffer[0, 0, :, : length + 1].transpose(0, 1))  # [L, kv_heads, dim] views
            values.append(buffer[1, 0, :, : length + 1].transpose(0, 1))
        # [n, kv_heads, L, dim]; ``mask`` [n, 1, 1, L] lets each session attend to its own tokens only
        keys = nn.utils.rnn.pad_sequence(keys, batch_first=True).transpose(1, 2)
        values = nn.utils.rnn.pad_sequence(values, batch_first=True).transpose(1, 2)
        if heads != kv_heads:
            keys = keys.repeat_interleave(heads // kv_heads, dim=1)
            values = values.repeat_interleave(heads // kv_heads, dim=1)
        query = q.view(n, 1, heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scaling)
        return out.transpose(1, 2).reshape(n, heads * dim)

    def _attention(self, query, keys, values, mask, tokens) -> torch.Tensor:
        """SDPA as transformers calls it for this step (GQA natively without a mask, repeated heads with one)."""
        batch = query.shape[0]
        groups = self.num_heads // self.num_kv_heads
        kwargs = {}
        if groups > 1:
            if mask is None:
                kwargs["enable_gqa"] = True
            else:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
        is_causal = mask is None and tokens > 1
        if self.on_gpu:  # GPU kernels run 3x faster on packed keys than on views into the longer cache buffer
            keys, values = keys.contiguous(), values.contiguous()
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, is_causal=is_causal,
                                             scale=self.scaling, **kwargs)
        return out.transpose(1, 2).reshape(batch * tokens, self.num_heads * self.head_dim)


def _attention_backends(on_gpu: bool):
    """On GPUs, SDPA without cuDNN: cuDNN builds a new plan for every key length, which a decode step changes each
    time (measured on an H100: 60 ms per call instead of 0.14 ms, benchmarks/gpu/sdpa_probe.py)."""
    if not on_gpu:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class _FusedLlamaLayer:
    """One decoder layer's weights, fused for the batched path (the module's parameters become views of these).

    Matrices are stored [in, out] (``x @ w``): MKL runs the small-batch products that batching produces 1.3-1.6x
    faster in this layout than with PyTorch's usual [out, in] weights, and single rows just as fast.
    """

    def __init__(self, block: nn.Module):
        attention, mlp = block.self_attn, block.mlp
        self.qkv_weight, self.qkv_bias = _fuse(attention, ("q_proj", "k_proj", "v_proj"))
        self.gate_up_weight, self.gate_up_bias = _fuse(mlp, ("gate_proj", "up_proj"))
        self.o_weight, self.o_bias = store_in_out(attention.o_proj), attention.o_proj.bias
        self.down_weight, self.down_bias = store_in_out(mlp.down_proj), mlp.down_proj.bias
        # transformers' SiLU module only calls F.silu: called directly, a step skips a module call per block
        self.act = F.silu if type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation") else mlp.act_fn
        self.input_norm = _RMSNorm(block.input_layernorm)
        self.post_norm = _RMSNorm(block.post_attention_layernorm)

    @property
    def matrices(self) -> list[torch.Tensor]:
        """The [in, out] matrices in the order a step reads them."""
        return [self.qkv_weight, self.o_weight, self.gate_up_weight, self.down_weight]


def _fuse(module: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
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


class _RMSNorm:
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


def _rope_in_place(qk: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> None:
    """``qk = qk * cos + rotate_half(qk) * sin`` (transformers' RoPE) in three ops: ``rotate_half(x) * sin`` is
    ``roll(x, half) * signed_sin``, the first half of sin negated (``_signed_sin``), with the same rounding."""
    rolled = qk.roll(qk.shape[-1] // 2, dims=-1)
    qk.mul_(cos).addcmul_(rolled, signed_sin)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


MAX_ROTARY_TABLE_BYTES = 64 << 20


def _rotary_tables(rotary: nn.Module, span: nn.Module) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
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
    return cos[0], _signed_sin(sin[0])
