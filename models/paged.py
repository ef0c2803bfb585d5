"""A paged key/value pool for a node's span: sessions keep their keys/values in fixed-size pages of one tensor.

``PagePool`` holds, for every block of the node's span, ``num_pages`` pages of ``page_size`` tokens
([blocks, pages, page_size, key/value, kv_heads, head_dim], allocated once). A session's ``PageTable`` lists its
pages in order; the same page ids serve every block, so one table (one row of a device tensor) describes a session
through the whole span. Page 0 is the scratch page: no session owns it, and the rows of a recorded round that stand
for no session (and the unused tail of every table row) point there.

Admission reserves a session's whole ``max_length`` in pages up front (``PagePool.open``): the pages are taken from
the free list as the session grows and go back when its caches are gone, but the reservation means a running
session never finds the pool empty, so the pool can never be overcommitted. A session the pool cannot hold is
refused at admission with ``CacheError`` (the node's ``MemoryCache`` refuses it first: it counts the same pages).

``PagedCache`` is one block's view of a session, with ``SpanCache``'s interface (``length``, ``crop``, ``writer``,
``write``, ``read``), so the eager batched path and ``BlockSpan.forward`` write and read the same pages the recorded
decode rounds (``nectar.node.graphs.PagedDecoder``) use.
"""

from __future__ import annotations

import collections
import threading
import weakref

import torch

from nectar.models.cache import CacheWriter
from nectar.models.errors import CacheError

SCRATCH_PAGE = 0


class PagePool:
    """Pages of keys/values for every block of a span, a free list, and the count of pages reserved to sessions.

    :param num_blocks: blocks of the node's span (each page holds keys/values of all of them)
    :param num_pages: pages in the pool, the scratch page included (so ``num_pages - 1`` serve sessions)
    :param page_size: tokens per page
    :param num_heads: key/value heads per block
    :param head_dim: size of each head
    """

    def __init__(
        self,
        *,
        num_blocks: int,
        num_pages: int,
        page_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        if num_pages < 2 or page_size < 1:
            raise CacheError(
                f"a page pool needs at least 2 pages (one is scratch) of >= 1 token, got {num_pages} of {page_size}: "
                "raise the node's cache budget or lower the page size"
            )
        self.page_size, self.num_pages = page_size, num_pages
        self.num_heads, self.head_dim = num_heads, head_dim
        self.storage = torch.zeros(
            (num_blocks, num_pages, page_size, 2, num_heads, head_dim), dtype=dtype, device=device
        )
        self._free = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out low ids first
        self._reserved = 0
        self._lock = threading.Lock()
        # (pages, reservation) of ended sessions: appended by garbage collection (any thread, even one holding the
        # lock), taken back under the lock by the next call
        self._returned: collections.deque[tuple[list[int], int]] = collections.deque()

    @staticmethod
    def page_bytes_for(num_blocks: int, page_size: int, num_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one page across all blocks (what one page of a session costs the node)."""
        return num_blocks * page_size * 2 * num_heads * head_dim * dtype.itemsize

    @property
    def num_blocks(self) -> int:
        return self.storage.shape[0]

    @property
    def page_bytes(self) -> int:
        return self.storage[:, 0].nbytes

    @property
    def capacity(self) -> int:
        """Pages sessions can hold (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def reserved_pages(self) -> int:
        with self._lock:
            self._drain()
            return self._reserved

    @property
    def free_pages(self) -> int:
        """Pages not in any session's table now (reserved ones not yet taken included)."""
        with self._lock:
            self._drain()
            return len(self._free)

    def pages_for(self, max_length: int) -> int:
        return -(-max_length // self.page_size)

    def reservation_bytes(self, max_length: int) -> int:
        """What a session of up to ``max_length`` tokens reserves: whole pages across all blocks."""
        return self.pages_for(max_length) * self.page_bytes

    def open(self, max_length: int, first_block: int, num_blocks: int) -> list[PagedCache]:
        """A new session's caches for blocks [first_block, first_block + num_blocks) of the span (one per block,
        sharing one page table), with ``max_length`` tokens reserved; CacheError when the pool cannot hold them."""
        if max_length < 1 or not 0 <= first_block < first_block + num_blocks <= self.num_blocks:
            raise CacheError(
                f"a paged session needs max_length >= 1 and blocks within 0..{self.num_blocks}, got {max_length} "
                f"tokens over blocks {first_block}:{first_block + num_blocks}"
            )
        pages = self.pages_for(max_length)
        with self._lock:
            self._drain()
            if self._reserved + pages > self.capacity:
                raise CacheError(
                    f"the paged KV pool has {self.capacity - self._reserved} of {self.capacity} pages unreserved, "
                    f"a session of {max_length} tokens needs {pages}: retry once a session ends, or use a shorter "
                    "max_length"
                )
            self._reserved += pages
        table = PageTable(self, pages)
        return [PagedCache(self, table, first_block + local, max_length) for local in range(num_blocks)]

    def _take(self) -> int:
        with self._lock:
            self._drain()
            return self._free.pop()  # never empty: every taken page is covered by a reservation

    def _release(self, pages: list[int], reserved: int) -> None:
        self._returned.append((pages, reserved))  # no lock: a finalizer may run inside a locked section

    def _drain(self) -> None:
        while self._returned:
            pages, reserved = self._returned.popleft()
            self._free.extend(reversed(pages))
            self._reserved -= reserved


class PageTable:
    """One session's pages in order (shared by its caches of every block); they go back to the pool once no cache
    refers to the table any more, or on ``close``."""

    def __init__(self, pool: PagePool, reserved: int):
        self.pool, self.reserved = pool, reserved
        self.pages: list[int] = []
        self._device_pages: torch.Tensor | None = None
        self._slots: tuple[int, int, torch.Tensor] | None = None  # the last write's (start, end, slots)
        self._finalizer = weakref.finalize(self, pool._release, self.pages, reserved)

    def ensure(self, length: int) -> None:
        """Takes pages until the table holds ``length`` tokens (within the reservation)."""
        wanted = self.pool.pages_for(length)
        if wanted > self.reserved:
            raise CacheError(
                f"{length} tokens need {wanted} pages, the session reserved {self.reserved}: crop it or open a "
                "session with a larger max_length"
            )
        while len(self.pages) < wanted:
            self.pages.append(self.pool._take())
            self._device_pages = None

    def device_pages(self) -> torch.Tensor:
        """The pages as a device tensor (rebuilt only when the table grew: one copy per page, not per step)."""
        if self._device_pages is None:
            self._device_pages = torch.tensor(self.pages, dtype=torch.long, device=self.pool.storage.device)
        return self._device_pages

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Flat row indices (page * page_size + offset) of tokens [start, end), reused by every block of a step."""
        if self._slots is None or self._slots[:2] != (start, end):
            size = self.pool.page_size
            slots = [self.pages[p // size] * size + p % size for p in range(start, end)]
            self._slots = (start, end, torch.tensor(slots, dtype=torch.long, device=self.pool.storage.device))
        return self._slots[2]

    def row(self, width: int) -> list[int]:
        """The table padded to ``width`` pages with the scratch page (the padding is masked out)."""
        return self.pages + [SCRATCH_PAGE] * (width - len(self.pages))

    def close(self) -> None:
        self._finalizer()


class PagedCache:
    """One block's keys/values of one session (one sequence) in a ``PagePool``; ``SpanCache``'s interface."""

    batch_size = 1
    num_blocks = 1

    def __init__(self, pool: PagePool, table: PageTable, block: int, max_length: int):
        self.pool, self.table, self.block = pool, table, block
        self.max_length = max_length
        self.length = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.pool.storage.dtype

    @property
    def device(self) -> torch.device:
        return self.pool.storage.device

    @property
    def num_heads(self) -> int:
        return self.pool.num_heads

    @property
    def head_dim(self) -> int:
        return self.pool.head_dim

    @property
    def is_inference(self) -> bool:
        return self.pool.storage.is_inference()

    @property
    def nbytes(self) -> int:
        """This block's share of the session's reserved pages."""
        return self.table.reserved * self.pool.page_bytes // self.pool.num_blocks

    def _flat(self) -> torch.Tensor:
        return self.pool.storage[self.block].view(-1, 2, self.pool.num_heads, self.pool.head_dim)

    def native_pointers(self) -> None:
        """The C decode kernels read one contiguous buffer a session (``SpanCache``), not pages."""
        return None

    def write(self, start: int, kv: torch.Tensor) -> None:
        """Stores ``kv`` [key/value, 1, kv_heads, T, head_dim] at positions [start, start + T)."""
        end = start + kv.shape[3]
        self.table.ensure(end)
        self._flat().index_copy_(0, self.table.slots(start, end), kv[:, 0].permute(2, 0, 1, 3))

    def read(self, end: int) -> torch.Tensor:
        """Keys and values of positions [0, end) as [key/value, 1, kv_heads, end, head_dim] (gathered: a copy)."""
        pages = self.table.device_pages()[: self.pool.pages_for(end)]
        rows = self.pool.storage[self.block].index_select(0, pages).view(-1, 2, self.num_heads, self.head_dim)
        return rows[:end].permute(1, 2, 0, 3).unsqueeze(1)

    def keys(self, block: int = 0) -> torch.Tensor:
        return self.read(self.length)[0]

    def values(self, block: int = 0) -> torch.Tensor:
        return self.read(self.length)[1]

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise CacheError(
                f"cannot crop a cache of {self.length} tokens to {length}: use 0 <= length <= {self.length}"
            )
        self.length = length  # the pages stay the session's; positions past `length` are masked and rewritten

    def writer(self, query_length: int) -> CacheWriter:
        if self.length + query_length > self.max_length:
            raise CacheError(
                f"this step needs {self.length + query_length} cached tokens but the cache holds at most "
                f"{self.max_length}: open a session with a larger max_length or crop it"
            )
        return CacheWriter(self, start=self.length)

    def __repr__(self) -> str:
        return (
            f"PagedCache(block={self.block}, length={self.length}, max_length={self.max_length}, "
            f"pages={len(self.table.pages)}/{self.table.reserved}, page_size={self.pool.page_size})"
        )
