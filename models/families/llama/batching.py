"""Batched inference through a node's Llama blocks: many sessions' new tokens go through the blocks in one forward.

Every token of every session goes through one fused QKV, output, gate/up and down projection per block (rows
stacked), RoPE at each row's absolute position, and attention per session against its own cache (a view, no copy).
Sessions keep their own ``SpanCache`` (their own slots): a batch may mix prefills and decodes at any lengths and
positions. It reproduces transformers' decoder layer operation for operation (``fused.py``), so a batched step
equals the unbatched one to float32 rounding (tests/speed). Quantized blocks (nf4, int8) batch too, through their own
quantized linears (rows stacked as well; rounds run eagerly: see ``LlamaBatchRunner``). Prompt-tuned first steps,
and blocks the kernels do not compute (sliding windows, mixtures of experts: ``unsupported``), take the generic path
(``BlockSpan.forward``, one session at a time).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nectar.models.attention import AttentionStep
from nectar.models.cpu_blas import native_kernel
from nectar.models.errors import CacheError
from nectar.models.families.llama import graphs
from nectar.models.families.llama.fused import FusedLayer, FusedLlamaBlocks, attention_backends
from nectar.models.families.llama.native_decode import NativeDecoder
from nectar.models.fast_path import SpanStep
from nectar.settings import current

logger = logging.getLogger(__name__)

# The parts of a decoder layer the fused kernels compute (``fused.py``): attention with or without per-head norms
BLOCK_PARTS = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
ATTENTION_PARTS = (_PROJECTIONS, _PROJECTIONS | {"q_norm", "k_norm"})
MLP_PARTS = frozenset({"gate_proj", "up_proj", "down_proj", "act_fn"})


def _parts(module: nn.Module | None) -> frozenset[str]:
    return frozenset(name for name, _ in module.named_children()) if module is not None else frozenset()


def _head_norms(attention: nn.Module) -> tuple[nn.Module, ...]:
    return (attention.q_norm, attention.k_norm) if hasattr(attention, "q_norm") else ()


def native_attention(runner: FusedLlamaBlocks):
    """The C kernel for a CPU node's decode rounds' attention (``nectar_decode_attention_f32``), or None: float32
    blocks on the CPU only, and not with ``NECTAR_NATIVE_ATTENTION=off`` (or ``NECTAR_NATIVE=off``)."""
    first = runner.spans[0]
    if not current().native_attention or first.device.type != "cpu" or first.dtype != torch.float32:
        return None
    if runner.quantized or runner.num_heads % runner.num_kv_heads:
        return None
    kernel = native_kernel()
    return kernel.nectar_decode_attention_f32 if kernel is not None else None


class LlamaBatchRunner(FusedLlamaBlocks):
    """Batched inference through a node's Llama blocks (one single-block ``BlockSpan`` per block), built by
    ``LlamaFamily.batch_runner`` when ``unsupported`` finds nothing the kernels lack.

    Routes: one session's single-token step through the C decode layer where it measured faster at load (CPU,
    ``native_decode.py``); otherwise the batched eager forward (``run``). ``static_step`` is the graph-safe decode
    step the node records as CUDA graphs.

    Quantized blocks run rounds batched through their own quantized layers; on GPUs nf4 blocks record rounds of any
    number of sessions (dequantizing into one shared scratch), int8 blocks none. No page pool, compiled route or C
    layer, whose steps read float weight matrices.
    """

    pages = True  # ``paged_step``: decode rounds over a node's page pool

    def __init__(self, spans: Sequence[nn.Module]):
        super().__init__(spans)
        if self.quantized:
            self.pages = False  # the paged step is recorded on GPUs: eager rounds over each session's own cache
        self.native: NativeDecoder | None = None
        self.native = NativeDecoder.build(self)  # one session's decode step in C on CPUs, where it measured faster
        self.native_attention = native_attention(self)  # decode rounds' attention in C on CPUs, with no padding
        self.compiled = graphs.compiles(self)
        self.fused = graphs.fuses(self)  # decode rounds in Triton kernels (decode_route, the default)
        self.fused_error: str | None = None  # why they stopped: Triton could not build them for this GPU
        if self.fused:
            began = time.perf_counter()
            graphs.warm_up_fused(self)
            logger.info(f"Built the decode round's Triton kernels in {time.perf_counter() - began:.1f}s")
        if self.compiled:  # NECTAR_DECODE_ROUTE=compiled on a GPU
            began = time.perf_counter()
            graphs.warm_up(self)
            logger.info(f"Compiled the decode round's fused kernels in {time.perf_counter() - began:.1f}s")

    def describe(self) -> str:
        route = "the C layer" if self.native is not None else "PyTorch"
        if self.compiled:
            route = "PyTorch, decode rounds through torch.compile's fused kernels"
        elif self.fused:
            route = "PyTorch, decode rounds through Triton kernels"
        if self.quantized:
            return (
                f"batched Llama runner ({self.quantization} weights through the blocks' own quantized layers; "
                + (
                    "rounds recorded, several rows dequantized into one shared scratch"
                    + (", norms, RoPE, attention and SwiGLU in Triton kernels" if self.fused else "")
                    if self.scratch is not None
                    else "rounds of several sessions eager"
                    + (", a lone session's recorded on GPUs" if self.static_positions else "")
                )
                + "; no page pool or C layer, which read float matrices)"
            )
        return f"batched Llama runner (fused projections; one session's decode step through {route})"

    @property
    def static_positions(self) -> int:
        """0 for int8 blocks (no recorded rounds): their linears dequantize a whole matrix even for one row."""
        return 0 if self.quantization == "int8" else super().static_positions

    @property
    def static_max_rows(self) -> int | None:
        """For quantized blocks, the rounds whose products allocate no float copy of a matrix, which every
        recording's private memory pool would keep (a 70B MLP matrix: 470 MB): any number of rows where nf4 layers
        dequantize into the span's shared scratch (GPU nodes, ``NF4Rows``), else a lone session's (bitsandbytes' fused
        kernel; eager, 80 nf4 blocks were launch-bound at 61 ms a token on an H100, whose ceiling is 12 ms)."""
        if not self.quantized or self.scratch is not None:
            return None
        return 1

    @staticmethod
    def supports(spans: Sequence[nn.Module]) -> bool:
        return LlamaBatchRunner.unsupported(spans) is None

    @staticmethod
    def unsupported(spans: Sequence[nn.Module]) -> str | None:
        """Why the fused kernels cannot compute these blocks exactly (for the node's log), or None when they can.
        They compute exactly the parts named in ``BLOCK_PARTS``: a block with any other part is refused."""
        for span in spans:
            if span.num_blocks != 1 or span.family is not spans[0].family or not hasattr(span.runner, "rotary"):
                return "the blocks are not single Llama-shaped blocks of one family"
            if span.runner.sliding_window is not None:
                return "sliding-window attention is not in the fused kernels"
            if getattr(span, "quantization", "none") != getattr(spans[0], "quantization", "none"):
                return "the blocks mix weight quantizations"
            block = span.blocks[0]
            attention, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
            if hasattr(mlp, "experts"):
                return "the mixture-of-experts MLP is not in the fused kernels"
            parts = (
                _parts(block) == BLOCK_PARTS
                and _parts(attention) in ATTENTION_PARTS
                and _parts(mlp) == MLP_PARTS
                and all(
                    hasattr(norm, "variance_epsilon")  # RMSNorms as Llama's
                    for norm in (block.input_layernorm, block.post_attention_layernorm, *_head_norms(attention))
                )
            )
            if not parts:
                return "the block has parts the fused kernels do not compute (not a Llama decoder layer)"
        return None

    @torch.inference_mode()
    def run(self, tasks: Sequence[SpanStep], first_block: int) -> list[torch.Tensor]:
        """Runs every task through blocks [start, end) (local indices from ``first_block``); returns [B, T, H] each."""
        device, dtype = self.spans[0].device, self.spans[0].dtype
        hidden_size = self.spans[0].hidden_size
        lengths = [task.caches[0].length for task in tasks]
        for task, length in zip(tasks, lengths):
            if length + task.hidden.shape[1] > task.caches[0].max_length:
                raise CacheError(
                    f"step needs {length + task.hidden.shape[1]} cached tokens, the session holds "
                    f"{task.caches[0].max_length}"
                )
        if self.native is not None and self.native.applies(tasks):
            return [self.native.run(tasks[0], first_block)]
        rows = [task.hidden.to(device, dtype).reshape(-1, hidden_size) for task in tasks]
        x = rows[0] if len(rows) == 1 else torch.cat(rows)
        positions = torch.cat(
            [
                torch.arange(length, length + task.hidden.shape[1], device=device).repeat(task.hidden.shape[0])
                for task, length in zip(tasks, lengths)
            ]
        )
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
        with attention_backends(self.on_gpu):
            for local in range(num_blocks):
                layer = self.layers[first_block + local]
                caches = [task.caches[local] for task in tasks]
                x = self._block(layer, x, cos, sin, groups, caches, decode_mask)
        for task, (_, _, _, tokens, length, _) in zip(tasks, groups):
            for cache in task.caches:
                cache.length = length + tokens
        return [x[begin:end].view(batch, tokens, hidden_size) for begin, end, batch, tokens, _, _ in groups]

    def _block(self, layer: FusedLayer, x, cos, sin, groups, caches, decode_mask=None) -> torch.Tensor:
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(layer, x, cos, sin)
        q, kv = qkv[:, :heads], qkv[:, heads:]
        if decode_mask is not None:
            attention = self._native_decode_attention(qkv, groups, caches) if self.native_attention else None
            if attention is None:
                attention = self._decode_attention(q, kv, groups, caches, decode_mask)
            return self.mlp(layer, x, attention)
        outputs = []
        for (begin, end, batch, tokens, length, mask), cache in zip(groups, caches):
            new_kv = kv[begin:end].view(batch, tokens, 2, kv_heads, dim).permute(2, 0, 3, 1, 4)
            cache.write(length, new_kv)  # keys and values in one copy (into pages for a PagedCache)
            keys, values = cache.read(length + tokens)  # [batch, kv_heads, length, head_dim] each
            query = q[begin:end].view(batch, tokens, heads, dim).transpose(1, 2)
            outputs.append(self._attention(query, keys, values, mask, tokens))
        attention = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return self.mlp(layer, x, attention)

    def _decode_attention(self, q, kv, groups, caches, mask) -> torch.Tensor:
        """One new token for each of n sessions: a single masked SDPA over their caches padded to the longest.

        Per session only the cache write and a gather stay; the per-session SDPA calls (about ten small ops each,
        which dominate a batched decode round on CPU and in kernel launches on GPUs) become one.
        """
        n, heads, kv_heads, dim = q.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        new_kv = kv.view(n, 2, kv_heads, dim)
        keys, values = [], []
        for index, ((_, _, _, _, length, _), cache) in enumerate(zip(groups, caches)):
            cache.write(length, new_kv[index][:, None, :, None])
            stored = cache.read(length + 1)  # [key/value, 1, kv_heads, L, dim]: views (gathered pages if paged)
            keys.append(stored[0, 0].transpose(0, 1))  # [L, kv_heads, dim]
            values.append(stored[1, 0].transpose(0, 1))
        # [n, kv_heads, L, dim]; ``mask`` [n, 1, 1, L] lets each session attend to its own tokens only
        keys = nn.utils.rnn.pad_sequence(keys, batch_first=True).transpose(1, 2)
        values = nn.utils.rnn.pad_sequence(values, batch_first=True).transpose(1, 2)
        if heads != kv_heads:
            keys = keys.repeat_interleave(heads // kv_heads, dim=1)
            values = values.repeat_interleave(heads // kv_heads, dim=1)
        query = q.view(n, 1, heads, dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scaling)
        return out.transpose(1, 2).reshape(n, heads * dim)

    def _native_decode_attention(self, qkv: torch.Tensor, groups, caches) -> torch.Tensor | None:
        """``_decode_attention`` in C (``nectar_decode_attention_f32``): each session's new key and value into its
        cache, and its query against that cache where it lies, so no cache is copied into a padded batch. None where
        the kernel cannot read the caches (pages, several rows) or the rows."""
        pointers = [cache.native_pointers() for cache in caches]
        if None in pointers or qkv.dtype != torch.float32 or qkv.stride()[1:] != (self.head_dim, 1):
            return None
        n = len(caches)
        lengths = [group[4] for group in groups]
        table = torch.tensor([pointer for column in zip(*pointers) for pointer in column] + lengths)
        address = table.data_ptr()
        out = torch.empty(n, self.num_heads * self.head_dim)
        scratch = torch.empty(max(lengths) + 1)
        self.native_attention(  # ctypes lets go of the GIL meanwhile: the node's event loop runs on
            qkv.data_ptr(),
            qkv.stride(0),
            n,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            address,
            address + 8 * n,
            address + 16 * n,
            address + 24 * n,
            self.scaling,
            out.data_ptr(),
            scratch.data_ptr(),
        )
        return out

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
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=is_causal, scale=self.scaling, **kwargs
        )
        return out.transpose(1, 2).reshape(batch * tokens, self.num_heads * self.head_dim)

    def static_step(
        self, x: torch.Tensor, positions: torch.Tensor, caches: list, first_block: int, pools: list | None = None
    ) -> torch.Tensor:
        return graphs.static_decode_step(self, x, positions, caches, first_block, pools)

    def paged_step(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        tables: torch.Tensor,
        storage: torch.Tensor,
        first_block: int,
        num_blocks: int,
    ) -> torch.Tensor:
        return graphs.paged_decode_step(self, x, positions, tables, storage, first_block, num_blocks)
