"""The paged KV pool (models/paged.py) and its decode rounds (node/graphs.py ``PagedDecoder``) on a CPU: the paged
static step runs eagerly (capture=False) and must equal the eager batched step and transformers' own layers one
session at a time, whatever sessions come and go, without new recordings.

The CUDA recordings of the same rounds are checked in test_cuda_graphs.py.
"""

from __future__ import annotations

import gc

import pytest
import torch

from nectar.models.errors import CacheError
from nectar.models.paged import SCRATCH_PAGE, PagedCache
from nectar.node.backend import SpanBackend
from nectar.node.memory_cache import MemoryCache
from nectar.wire.protocol import NodeRPCError

TOLERANCE = 1e-5  # float32, as test_batched_compute.py
MiB = 2**20


def _backend(path: str, *, batching: bool = True, **kwargs) -> SpanBackend:
    return SpanBackend(path, 0, 4, dtype=torch.float32, device="cpu", show_progress=False, batching=batching, **kwargs)


class _Sessions:
    """Sessions run on a paged backend and, token for token, on references (transformers one by one, and the
    batched eager path over own caches)."""

    def __init__(self, paged: SpanBackend, *references: SpanBackend):
        self.paged, self.references = paged, references
        self.caches: dict[str, list] = {}  # name -> [paged caches, each reference's caches]
        self.positions: dict[str, int] = {}
        self.generator = torch.Generator().manual_seed(0)

    def open(self, name: str, max_length: int = 40, prompt: int = 5) -> float:
        backends = (self.paged, *self.references)
        self.caches[name] = [backend.new_caches(0, 4, 1, max_length) for backend in backends]
        self.positions[name] = 0
        return self.round({name: prompt})

    def close(self, name: str) -> None:
        del self.caches[name], self.positions[name]
        gc.collect()  # the pages go back once no cache refers to the session's table

    def round(self, tokens: dict[str, int]) -> float:
        """One step of the named sessions (``tokens`` new tokens each) in one round; the largest difference."""
        hidden = {
            name: torch.randn(1, count, self.paged.hidden_size, generator=self.generator)
            for name, count in tokens.items()
        }
        worst = 0.0
        outputs = []
        for index, backend in enumerate((self.paged, *self.references)):
            tasks = [
                backend.inference_task(
                    hidden[name], self.caches[name][index], start=0, end=4, position=self.positions[name]
                )
                for name in tokens
            ]
            outputs.append(backend.run_inference(tasks))
        for reference in outputs[1:]:
            for got, expected in zip(outputs[0], reference):
                worst = max(worst, (got - expected).abs().max().item())
        for name, count in tokens.items():
            self.positions[name] += count
        return worst


def test_paged_rounds_equal_eager_steps_as_sessions_come_and_go(tiny_llama):
    paged = _backend(tiny_llama, page_size=16, cache_bytes=MiB)
    decoder = paged.paged
    assert decoder is not None and not decoder.capture and paged.decode_graphs is None  # CPU: no CUDA graphs
    sessions = _Sessions(paged, _backend(tiny_llama, batching=False), _backend(tiny_llama))
    worst = max(sessions.open(name, prompt=prompt) for name, prompt in zip("abc", (5, 3, 7)))
    assert all(isinstance(cache, PagedCache) for cache in sessions.caches["a"][0])
    assert decoder.recorded == 0  # prefills are eager
    for _ in range(2):
        worst = max(worst, sessions.round({"a": 1, "b": 1, "c": 1}))  # bucket 4
        worst = max(worst, sessions.round({"a": 1}))  # bucket 1
        worst = max(worst, sessions.round({"b": 1, "c": 1}))  # bucket 2
    assert decoder.recorded == 3
    sessions.close("b")
    worst = max(worst, sessions.open("d", prompt=4))
    worst = max(worst, sessions.round({"a": 1, "c": 1, "d": 1}))  # another composition, same bucket
    worst = max(worst, sessions.round({"d": 1}))
    worst = max(worst, sessions.round({"c": 2, "d": 1}))  # a two-token step: the eager path, over the same pages
    worst = max(worst, sessions.round({"c": 1, "d": 1}))  # and back to replays
    sessions.close("a")
    worst = max(worst, sessions.open("e", prompt=2))
    worst = max(worst, sessions.round({"c": 1, "d": 1, "e": 1}))
    assert decoder.recorded == 3, decoder._graphs.keys()  # one per bucket, whoever the rows are
    assert {key[2] for key in decoder._graphs} == {1, 2, 4}
    assert decoder.replays == 10  # every single-token round
    assert worst <= TOLERANCE, worst


def test_sessions_grow_across_page_boundaries(tiny_llama):
    """Pages of 4 tokens: a session of 3 tokens decodes to 21, taking a page every 4 tokens; tables widen by powers
    of two (one recording per width), and every step equals transformers'."""
    paged = _backend(tiny_llama, page_size=4, cache_bytes=MiB)
    sessions = _Sessions(paged, _backend(tiny_llama, batching=False))
    worst = max(sessions.open("long", max_length=24, prompt=3), sessions.open("short", max_length=24, prompt=2))
    for _ in range(18):
        worst = max(worst, sessions.round({"long": 1, "short": 1}))
    table = sessions.caches["long"][0][0].table
    assert len(table.pages) == 6 and len(set(table.pages)) == 6 and SCRATCH_PAGE not in table.pages  # 21 tokens
    assert len(sessions.caches["short"][0][0].table.pages) == 5  # 20 tokens
    assert not set(table.pages) & set(sessions.caches["short"][0][0].table.pages)
    # widths 1, 2, 4 and 8 pages, each recorded once for the round of two
    assert sorted(key[3] for key in paged.paged._graphs) == [1, 2, 4, 8] and paged.paged.recorded == 4
    # a client rolls back 7 tokens (into an earlier page) and goes on: the cropped positions are rewritten
    sessions.positions["long"] -= 7
    for _ in range(3):
        worst = max(worst, sessions.round({"long": 1, "short": 1}))
    worst = max(worst, sessions.round({"long": 3}))  # and an eager step over the rewritten pages
    assert len(table.pages) == 6  # the session keeps its pages
    assert worst <= TOLERANCE, worst


def test_freed_pages_are_reused_without_stale_keys(tiny_llama):
    paged = _backend(tiny_llama, page_size=4, cache_bytes=MiB)
    pool = paged.pages
    sessions = _Sessions(paged, _backend(tiny_llama, batching=False))
    worst = max(sessions.open("old", prompt=11), sessions.open("other", prompt=6))
    for _ in range(3):
        worst = max(worst, sessions.round({"old": 1, "other": 1}))
    old_pages = list(sessions.caches["old"][0][0].table.pages)
    free = pool.free_pages
    sessions.close("old")
    assert pool.free_pages == free + len(old_pages) == pool.capacity - len(sessions.caches["other"][0][0].table.pages)
    # the new session takes the freed pages, holding the old session's keys past its own short prompt
    worst = max(worst, sessions.open("new", prompt=2))
    new_table = sessions.caches["new"][0][0].table
    assert new_table.pages[0] == old_pages[0]
    for _ in range(6):  # into the old session's second and third pages
        worst = max(worst, sessions.round({"new": 1, "other": 1}))
    assert set(new_table.pages) <= set(old_pages)
    assert worst <= TOLERANCE, worst


def test_a_full_pool_refuses_sessions_and_keeps_the_others_intact(tiny_llama):
    probe = _backend(tiny_llama, page_size=4, cache_bytes=MiB)
    page_bytes = probe.pages.page_bytes
    paged = _backend(tiny_llama, page_size=4, cache_bytes=10 * page_bytes)  # 10 pages: 40 tokens
    assert paged.pages.capacity == 10
    sessions = _Sessions(paged, _backend(tiny_llama, batching=False))
    worst = sessions.open("a", max_length=24, prompt=5)  # reserves 6 pages
    with pytest.raises(CacheError, match="pages unreserved"):
        paged.new_caches(0, 4, 1, 20)  # 5 more pages: only 4 left
    worst = max(worst, sessions.open("b", max_length=16, prompt=3))  # 4 pages: fits exactly
    assert paged.pages.reserved_pages == 10
    with pytest.raises(CacheError):
        paged.new_caches(0, 4, 1, 1)
    for _ in range(8):
        worst = max(worst, sessions.round({"a": 1, "b": 1}))
    # b's reservation ends at 16 tokens: a step past it is refused, not written into another session's pages
    with pytest.raises(CacheError):
        sessions.caches["b"][0][0].table.ensure(17)
    assert worst <= TOLERANCE, worst


def test_memory_accounting_counts_reserved_pages(tiny_llama):
    paged = _backend(tiny_llama, page_size=16, cache_bytes=MiB)
    pool = paged.pages
    bytes_per_token = paged.cache_bytes_per_token(0, 4)
    assert pool.page_bytes == 16 * bytes_per_token  # the pool spans the backend's 4 blocks
    assert pool.capacity == MiB // pool.page_bytes  # the budget's worth of pages, plus the scratch page
    # 33 tokens reserve three whole pages across every block of the pool (a sub-span's session too)
    assert paged.session_cache_bytes(0, 4, 1, 33) == paged.session_cache_bytes(1, 3, 1, 33) == 3 * pool.page_bytes
    assert paged.session_cache_bytes(0, 4, 2, 33) == 2 * 33 * bytes_per_token  # two rows: own caches, as before
    memory = MemoryCache(MiB, bytes_per_token)
    with memory.reserve(paged.session_cache_bytes(0, 4, 1, 33)):
        caches = paged.new_caches(0, 4, 1, 33)
        assert memory.used_bytes == 3 * pool.page_bytes and pool.reserved_pages == 3
        assert sum(cache.nbytes for cache in caches) == memory.used_bytes
        assert len(caches[0].table.pages) == 0  # reserved, taken as the session grows
        with pytest.raises(NodeRPCError, match="node busy"):  # the budget refuses before the pool would
            with memory.reserve(paged.session_cache_bytes(0, 4, 1, pool.capacity * 16)):
                pass
    del caches
    gc.collect()
    assert memory.used_bytes == 0 and pool.reserved_pages == 0 and pool.free_pages == pool.capacity


def test_sessions_of_several_rows_keep_their_own_caches_beside_paged_ones(tiny_llama):
    paged = _backend(tiny_llama, page_size=8, cache_bytes=MiB)
    plain = _backend(tiny_llama, batching=False)
    rows = [paged.new_caches(0, 4, 2, 20), plain.new_caches(0, 4, 2, 20)]
    assert not isinstance(rows[0][0], PagedCache)
    sessions = _Sessions(paged, plain)
    worst = sessions.open("one", prompt=3)
    generator = torch.Generator().manual_seed(1)
    position = 0
    for tokens in (4, 1, 1):  # rounds mixing a paged session and a two-row one: the eager path
        x = torch.randn(2, tokens, paged.hidden_size, generator=generator)
        y = torch.randn(1, 1, paged.hidden_size, generator=generator)
        tasks = [
            paged.inference_task(x, rows[0], start=0, end=4, position=position),
            paged.inference_task(y, sessions.caches["one"][0], start=0, end=4, position=sessions.positions["one"]),
        ]
        got = paged.run_inference(tasks)
        expected = [
            plain.inference_step(x, rows[1], start=0, end=4, position=position),
            plain.inference_step(y, sessions.caches["one"][1], start=0, end=4, position=sessions.positions["one"]),
        ]
        worst = max(worst, *((g - e).abs().max().item() for g, e in zip(got, expected)))
        position += tokens
        sessions.positions["one"] += 1
    assert paged.paged.replays == 0
    assert worst <= TOLERANCE, worst


def test_paged_sub_spans_and_prompted_first_steps(tiny_llama):
    """A session over a sub-span keeps its keys/values in its blocks' rows of the pool (the round replays over
    those blocks only), and a prompted first step (``BlockSpan.forward``, one session alone) writes the same pages."""
    paged, plain = _backend(tiny_llama, page_size=4, cache_bytes=MiB), _backend(tiny_llama, batching=False)
    hidden = paged.hidden_size
    generator = torch.Generator().manual_seed(2)
    sub = [paged.new_caches(1, 3, 1, 30), plain.new_caches(1, 3, 1, 30)]
    full = [paged.new_caches(0, 4, 1, 30), plain.new_caches(0, 4, 1, 30)]
    assert [cache.block for cache in sub[0]] == [1, 2] and sub[0][0].table is sub[0][1].table
    prompts = torch.randn(4, 1, 3, hidden, generator=generator) * 0.5
    worst, position = 0.0, {"sub": 0, "full": 0}
    for step in range(7):
        tokens = 5 if step == 0 else 1
        x_sub = torch.randn(1, tokens, hidden, generator=generator)
        x_full = torch.randn(1, tokens, hidden, generator=generator)
        first = prompts if step == 0 else None
        for backend, index in ((paged, 0), (plain, 1)):
            out_sub = backend.inference_step(x_sub, sub[index], start=1, end=3, position=position["sub"])
            out_full = backend.inference_step(
                x_full, full[index], start=0, end=4, position=position["full"], prompts=first
            )
            if index == 0:
                got = (out_sub, out_full)
            else:
                worst = max(worst, (got[0] - out_sub).abs().max().item(), (got[1] - out_full).abs().max().item())
        position["sub"] += tokens
        position["full"] += tokens
    assert {key[:2] for key in paged.paged._graphs} == {(1, 2), (0, 4)}
    assert worst <= TOLERANCE, worst
