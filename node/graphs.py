"""CUDA graphs for single-token decode steps: one session's step through a node's blocks as one graph replay.

A decode step of one session launches ~45 small kernels per block; on a GPU the CPU cannot launch them as fast as
the GPU runs them, so a 16-block span costs ~10 ms of launches for ~3 ms of GPU work. ``GraphedDecoder`` captures
the step once per session (and sub-span) with shapes that do not change from step to step: the position is a
device tensor, RoPE comes from a precomputed table, keys/values are written with ``index_copy_`` and attention
covers the session's whole preallocated cache under a mask of the positions not yet written. Later steps copy the
input in, set the position and replay.

Used by ``LlamaBatchRunner`` on CUDA devices for steps of one row and one token; everything else (prefills,
batches of several sessions, deep prompts) takes the eager path, which writes the same cache layout, so a session
may alternate freely. ``capture=False`` runs the same static step eagerly (how the CPU tests check it).
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from nectar.node.batching import InferenceTask, LlamaBatchRunner

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: Optional["torch.cuda.CUDAGraph"]
    input: torch.Tensor  # [1, hidden]
    position: torch.Tensor  # [1] int64
    output: Optional[torch.Tensor]  # [1, hidden], written by the replay


class GraphedDecoder:
    """Captures and replays single-token steps; holds no reference to a session's cache (graphs die with it).

    :param runner: the batched runner whose fused weights and attention settings the graphs use
    :param capture: record CUDA graphs (False: run the static step eagerly, e.g. on a CPU)
    """

    def __init__(self, runner: "LlamaBatchRunner", *, capture: bool = True):
        from nectar.node.batching import _attention_backends

        self.runner, self.capture = runner, capture
        self._backends = _attention_backends
        first = runner.spans[0]
        self.device, self.dtype, self.hidden_size = first.device, first.dtype, first.hidden_size
        self.max_positions = int(getattr(first.config, "max_position_embeddings", 0) or 0)
        self._graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # first SpanCache -> {span: _Graph}
        self.enabled = self.max_positions > 0 and getattr(runner.rotary, "rope_type", "default") == "default"
        if self.enabled:
            with torch.inference_mode():
                positions = torch.arange(self.max_positions, device=self.device)
                cos, sin = runner.rotary(torch.zeros(1, 1, device=self.device, dtype=self.dtype), positions[None])
            self.cos_table, self.sin_table = cos[0], sin[0]  # [max_positions, head_dim]
        self.replays = 0

    def applies(self, task: "InferenceTask") -> bool:
        cache = task.caches[0]
        return (self.enabled and tuple(task.hidden.shape[:2]) == (1, 1) and task.batch_key is not None
                and cache.length + 1 <= cache.max_length and cache.max_length <= self.max_positions)

    @torch.inference_mode()
    def run(self, task: "InferenceTask", first_block: int) -> torch.Tensor:
        """The step's output [1, 1, hidden]; advances the session's caches by one token."""
        caches = task.caches
        span = (first_block, len(caches))
        per_session = self._graphs.setdefault(caches[0], {})
        entry = per_session.get(span)
        length = caches[0].length
        if entry is None:
            entry = per_session[span] = self._record(caches, first_block, task.hidden, length)
        else:
            entry.input.copy_(task.hidden.reshape(1, -1))
            entry.position.fill_(length)
            if entry.graph is not None:
                entry.graph.replay()
            else:
                entry.output = self._step(entry.input, entry.position, [c.buffer[0] for c in caches], first_block)
        self.replays += 1
        for cache in caches:
            cache.length = length + 1
        return entry.output.view(1, 1, self.hidden_size)

    def _record(self, caches, first_block: int, hidden: torch.Tensor, length: int) -> _Graph:
        static_input = hidden.reshape(1, -1).to(self.device, self.dtype).clone()
        position = torch.full((1,), length, dtype=torch.long, device=self.device)
        buffers = [cache.buffer[0] for cache in caches]
        if not self.capture:
            return _Graph(None, static_input, position, self._step(static_input, position, buffers, first_block))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._backends(True):
            self._step(static_input, position, buffers, first_block)  # warm-up: kernel choice, workspaces
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._backends(True):  # a private pool: a shared one breaks once a graph dies
            output = self._step(static_input, position, buffers, first_block)
        graph.replay()  # the capture recorded the step; run it (it rewrites the same keys/values as the warm-up)
        logger.debug(f"Captured a decode graph for blocks {first_block}:{first_block + len(caches)}")
        return _Graph(graph, static_input, position, output)

    def _step(self, x: torch.Tensor, position: torch.Tensor, buffers: list, first_block: int) -> torch.Tensor:
        """One token through the blocks with position-independent shapes (graph-safe: no host syncs)."""
        runner = self.runner
        heads, kv_heads, dim = runner.num_heads, runner.num_kv_heads, runner.head_dim
        max_length = buffers[0].shape[3]
        cos = self.cos_table.index_select(0, position)[:, None]  # [1, 1, head_dim]
        sin = self.sin_table.index_select(0, position)[:, None]
        key_positions = torch.arange(max_length, device=self.device)
        mask = torch.zeros(1, 1, 1, max_length, dtype=self.dtype, device=self.device)
        mask.masked_fill_(key_positions > position, torch.finfo(self.dtype).min)
        groups = heads // kv_heads
        from nectar.node.batching import _linear, _rotate_half

        for local, buffer in enumerate(buffers):  # buffer: [key/value, 1, kv_heads, max_length, head_dim]
            layer = runner.layers[first_block + local]
            qkv = _linear(layer.input_norm(x), layer.qkv_weight, layer.qkv_bias).view(1, heads + 2 * kv_heads, dim)
            qk = qkv[:, : heads + kv_heads]
            qk.copy_(qk * cos + _rotate_half(qk) * sin)
            new_kv = qkv[:, heads:].view(1, 1, 2, kv_heads, dim).permute(2, 0, 3, 1, 4)  # [2, 1, kv_heads, 1, dim]
            buffer.index_copy_(3, position, new_kv)
            keys, values = buffer[0], buffer[1]
            if groups > 1:
                keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            query = qkv[:, :heads].view(1, 1, heads, dim).transpose(1, 2)
            attention = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=runner.scaling)
            x = x + _linear(attention.transpose(1, 2).reshape(1, heads * dim), layer.o_weight, layer.o_bias)
            gate, up = _linear(layer.post_norm(x), layer.gate_up_weight, layer.gate_up_bias).chunk(2, dim=-1)
            x = x + _linear(layer.act(gate) * up, layer.down_weight, layer.down_bias)
        return x
