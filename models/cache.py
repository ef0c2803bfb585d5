"""Preallocated KV cache of one span, and the writer the transformers layers call during a step.

Storage and bookkeeping are split on purpose: ``SpanCache`` owns the buffers and the length, ``CacheWriter`` is the
short-lived object handed to the layers as ``cache`` (they call ``update(key, value, layer_idx, ...)``). A later
continuous-batching change can swap in a writer over a shared pool (one forward, many sessions) without touching
the family code: ``PagedCache`` (``paged.py``) has the same interface over a node's page pool, and the writer takes
either.
"""

from __future__ import annotations

import logging

import torch

from nectar.models.errors import CacheError

logger = logging.getLogger(__name__)


class SpanCache:
    """Keys/values of every block of one span for one session, preallocated to ``max_length`` tokens.

    Created by ``BlockSpan.new_cache``; passed back to ``BlockSpan.forward(..., cache=...)``, which appends each step.

    :param num_blocks: blocks in the span (one key and one value buffer each)
    :param batch_size: rows (sequences) the cache holds
    :param max_length: the most tokens it can hold
    :param num_heads: key/value heads per block
    :param head_dim: size of each head
    :param dtype: buffer dtype (the span's)
    :param device: buffer device (the span's)
    """

    def __init__(
        self,
        *,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if batch_size < 1 or max_length < 1:
            raise CacheError(f"a cache needs batch_size >= 1 and max_length >= 1, got {batch_size} and {max_length}")
        self.batch_size = batch_size
        self.max_length = max_length
        self.length = 0
        # [block, key/value, batch, heads, position, head_dim]: one allocation, so nbytes and moves are trivial
        self.buffer = torch.zeros(
            (num_blocks, 2, batch_size, num_heads, max_length, head_dim), dtype=dtype, device=device
        )
        self._native: tuple | None = None  # (buffer, native_pointers()) once asked

    @property
    def num_blocks(self) -> int:
        return self.buffer.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    @property
    def num_heads(self) -> int:
        return self.buffer.shape[3]

    @property
    def head_dim(self) -> int:
        return self.buffer.shape[5]

    @property
    def is_inference(self) -> bool:
        return self.buffer.is_inference()

    def write(self, start: int, kv: torch.Tensor) -> None:
        """Stores ``kv`` [key/value, batch, heads, T, head_dim] at positions [start, start + T) of the first block
        (a node's caches hold one block each; ``PagedCache`` has the same method over pages)."""
        self.buffer[0, :, :, :, start : start + kv.shape[3]].copy_(kv)

    def read(self, end: int) -> torch.Tensor:
        """The first block's keys and values of positions [0, end): [key/value, batch, heads, end, head_dim] (a
        view)."""
        return self.buffer[0, :, :, :, :end]

    def native_pointers(self) -> tuple[int, int, int] | None:
        """(keys, values, head stride) of the first block's one row, for the C decode kernels
        (``nectar_decode_attention_f32``), or None where they cannot read it (not float32 on the CPU, several rows)."""
        buffer = self.buffer
        if self._native is not None and self._native[0] is buffer:  # (a GPU node's graphs may swap the buffer)
            return self._native[1]
        pointers = None
        if buffer.device.type == "cpu" and buffer.dtype == torch.float32 and buffer.shape[2] == 1:
            if buffer.is_contiguous():
                size = buffer.element_size()
                pointers = (buffer.data_ptr(), buffer.data_ptr() + buffer.stride(1) * size, buffer.stride(3))
        self._native = (buffer, pointers)
        return pointers

    def keys(self, block: int) -> torch.Tensor:
        """Block ``block``'s valid keys ``[batch, heads, length, head_dim]`` (a view)."""
        return self.buffer[block, 0, :, :, : self.length]

    def values(self, block: int) -> torch.Tensor:
        return self.buffer[block, 1, :, :, : self.length]

    def crop(self, length: int) -> None:
        """Forget everything past ``length`` tokens, e.g. to replay a step after a failure downstream."""
        if not 0 <= length <= self.length:
            raise CacheError(
                f"cannot crop a cache of {self.length} tokens to {length}: use 0 <= length <= {self.length}"
            )
        self.length = length  # stale entries past `length` are never read and get overwritten by the next step

    def writer(self, query_length: int) -> CacheWriter:
        """The object the layers write this step's keys/values through; check the step fits first."""
        if self.length + query_length > self.max_length:
            raise CacheError(
                f"this step needs {self.length + query_length} cached tokens but the cache holds at most "
                f"{self.max_length}: allocate a larger cache (new_cache(batch_size, max_length)) or crop it"
            )
        return CacheWriter(self, start=self.length)

    def __repr__(self) -> str:
        return (
            f"SpanCache(num_blocks={self.num_blocks}, batch_size={self.batch_size}, length={self.length}, "
            f"max_length={self.max_length}, dtype={self.dtype}, nbytes={self.nbytes})"
        )


class CacheWriter:
    """Transformers-compatible cache for one step: ``update`` writes at ``[start, start + T)``, returns all keys so far.

    Only lives for one ``BlockSpan.forward``; the owning ``SpanCache.length`` advances after every block ran.
    """

    def __init__(self, cache: SpanCache, *, start: int):
        self.cache = cache
        self.start = start

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.start + key_states.shape[-2]
        if isinstance(self.cache, SpanCache):
            block = self.cache.buffer[layer_idx]
            block[0, :, :, self.start : end].copy_(key_states)
            block[1, :, :, self.start : end].copy_(value_states)
            return block[0, :, :, :end], block[1, :, :, :end]
        self.cache.write(self.start, torch.stack((key_states, value_states)))  # a PagedCache: one block
        kv = self.cache.read(end)
        return kv[0], kv[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.start + query_length, 0
