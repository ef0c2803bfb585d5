"""CUDA graphs for decode rounds: one or many sessions' single-token steps through a node's blocks as one replay.

A decode step launches ~45 small kernels per block, and a batched round adds a few per session per block; on a GPU
the CPU cannot launch them as fast as the GPU runs them (a 16-block span: ~10 ms of launches for one session's
~3 ms of GPU work, and more for a batch). ``GraphedDecoder`` records a round once per *composition* (the sessions
in it, and the sub-span) through the family runner's ``static_step`` (``nectar.models.fast_path.BatchRunner``),
whose shapes do not change from step to step: positions are a device tensor and each session attends over its whole
preallocated cache. Later rounds of the same sessions copy the inputs in, set the positions and replay. A round of
only some of a recorded round's sessions (one finished its turn late, or rounds split) replays it too, the absent
rows computing a throwaway token. Sessions with equal cache sizes share one key/value tensor per block in their
recording (``_pool``): all their writes, and their attention, are one call each per block.

A session alone is recorded at its first decode step. A round of several sessions without a recording is
recorded for every session active lately (in the last few rounds, a prefill included), once that set has come
``record_after`` times among recent rounds (once, by default): continuous batching repeats the same sessions round
after round (whichever way its rounds split), and recording a round costs about what running it eagerly does (an
eager round of 14 sessions through 32 blocks took 103 ms on an H100, the recording of 16 108 ms, a replay 9.4 ms).
Rounds that are not recorded take the eager path, which writes the same cache layout, so a session may alternate
freely. Graphs are kept in a small LRU and dropped once any of their sessions' caches is gone. ``capture=False``
runs the same static step eagerly (how the CPU tests check it).

``PagedDecoder`` is the route for sessions whose caches live in a node's page pool (``nectar.models.paged``): one
recording per (sub-span, row bucket, table width) serves any sessions, so arrivals and departures record nothing.
"""

from __future__ import annotations

import collections
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nectar.models.cache import SpanCache
from nectar.models.fast_path import BatchRunner, SpanStep

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    key: tuple
    graph: torch.cuda.CUDAGraph | None
    sessions: tuple  # per row: weakrefs to that session's SpanCaches (one per block)
    input: torch.Tensor  # [n, hidden]
    positions: torch.Tensor  # [n] int64: where each session's token goes
    output: torch.Tensor | None  # [n, hidden], written by the replay
    pools: list | None = None  # per block, the sessions' keys/values in one tensor [n, 2, kv_heads, L, dim]

    def live_sessions(self) -> list[list] | None:
        """Each row's SpanCaches, or None once any of them is gone."""
        sessions = [[ref() for ref in refs] for refs in self.sessions]
        return None if any(cache is None for caches in sessions for cache in caches) else sessions


class GraphedDecoder:
    """Records and replays decode rounds; holds only weak references to sessions' caches.

    :param runner: the family's batched runner, whose ``static_step`` the graphs record
    :param capture: record CUDA graphs (False: run the static step eagerly, e.g. on a CPU)
    :param max_graphs: recorded rounds kept (least recently used dropped first)
    :param record_after: sightings of a composition, among the last ``window`` rounds, before it is recorded
    :param max_sessions: the largest round recorded
    :param active_rounds: a session seen in this many last rounds counts as active: a new round is recorded for all
        active sessions of its sub-span, so rounds of any mix of them replay it
    """

    def __init__(
        self,
        runner: BatchRunner,
        *,
        capture: bool = True,
        max_graphs: int = 64,
        record_after: int = 1,
        window: int = 256,
        max_sessions: int = 64,
        active_rounds: int = 4,
    ):
        self.runner, self.capture = runner, capture
        self.max_graphs, self.record_after, self.window = max_graphs, record_after, window
        self.max_sessions, self.active_rounds = min(max_sessions, runner.static_max_rows or max_sessions), active_rounds
        self.device, self.dtype, self.hidden_size = runner.device, runner.dtype, runner.hidden_size
        self._graphs: collections.OrderedDict[tuple, _Graph] = collections.OrderedDict()
        self._sightings: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._gone: list[tuple] = []  # keys of graphs whose session ended (appended from any thread)
        # id of a session's first SpanCache -> (round last seen, sub-span, weakrefs to its SpanCaches)
        self._active: collections.OrderedDict[int, tuple] = collections.OrderedDict()
        self._rounds = 0
        self.max_positions = runner.static_positions
        self.enabled = self.max_positions > 0  # a runner without a static step records nothing
        self.replays = self.recorded = 0
        self._zero_row = torch.zeros(1, self.hidden_size, dtype=self.dtype)  # an absent session's input

    def applies(self, tasks: Sequence[SpanStep]) -> bool:
        """Whether these steps could run as a recorded round: one row and one token each, room in every cache."""
        if not self.enabled or not 1 <= len(tasks) <= self.max_sessions:
            return False
        return all(
            tuple(task.hidden.shape[:2]) == (1, 1)
            and task.caches[0].length < task.caches[0].max_length
            and self._graphable(task)
            for task in tasks
        )

    def _graphable(self, task: SpanStep) -> bool:
        """Whether the task's session could ever be in a recorded round: one row, batchable, positions in the table."""
        cache = task.caches[0]
        return (
            isinstance(cache, SpanCache)  # a PagedCache's round is ``PagedDecoder``'s
            and cache.batch_size == 1
            and task.batchable
            and cache.max_length <= self.max_positions
        )

    @torch.inference_mode()
    def run(self, tasks: Sequence[SpanStep], first_block: int) -> list[torch.Tensor] | None:
        """Each task's output [1, 1, hidden] (advancing its caches by one token), or None: not recorded (yet), the
        caller runs the round eagerly.

        A round of some of a recorded round's sessions replays that one: the absent sessions' rows compute a token
        of zeros at their next position, which their own next step overwrites before anything reads it."""
        while self._gone:  # drop them here, on the compute thread, where graphs replay
            self._graphs.pop(self._gone.pop(), None)
        by_id = {id(task.caches[0]): task for task in tasks}
        span = (first_block, len(tasks[0].caches))
        key = (*span, *sorted(by_id))
        self._rounds += 1
        for task in tasks:
            self._see(task, span)
        entry = self._graphs.get(key) or self._superset(span, by_id)
        if entry is None:
            members = self._active_sessions(span, by_id)  # record for everyone active, so later mixes replay it
            key = (*span, *sorted(members))
            if len(members) > 1 and not self._seen_enough(key):  # a lone session's steps always repeat
                return None
            entry = self._graphs[key] = self._record([members[i] for i in key[2:]], first_block, key)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
            self._sightings.pop(key, None)
        sessions = entry.live_sessions()
        if sessions is None:  # a session ended while this round was being formed
            self._graphs.pop(entry.key, None)
            return None
        rows = {id(caches[0]): row for row, caches in enumerate(sessions)}
        lengths = [caches[0].length for caches in sessions]
        if any(
            id(caches[0]) not in by_id and length >= caches[0].max_length for caches, length in zip(sessions, lengths)
        ):
            return None  # an absent session's cache is full: no spare position to write
        self._graphs.move_to_end(entry.key)
        # one host tensor each for inputs and positions, one copy each (few torch calls: each may wait for the GIL)
        hidden = [
            by_id[id(caches[0])].hidden.reshape(1, -1) if id(caches[0]) in by_id else self._zero_row
            for caches in sessions
        ]
        entry.input.copy_(hidden[0] if len(hidden) == 1 else torch.cat(hidden))
        entry.positions.copy_(torch.tensor(lengths))
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.output = self.runner.static_step(entry.input, entry.positions, sessions, first_block, entry.pools)
        self.replays += 1
        outputs = []
        for task in tasks:
            row = rows[id(task.caches[0])]
            for cache in task.caches:
                cache.length = lengths[row] + 1
            outputs.append(entry.output[row : row + 1].view(1, 1, self.hidden_size))
        return outputs

    def note_sessions(self, tasks: Sequence[SpanStep], first_block: int) -> None:
        """Counts the sessions of a round run eagerly (a prefill, most often) as active: sessions that open together
        then share the recording of their first decode round, instead of one recording per group of arrivals (three
        per run of 16 sessions before, at 60-110 ms each on an H100)."""
        if not self.enabled:
            return
        span = (first_block, len(tasks[0].caches))
        for task in filter(self._graphable, tasks):
            self._see(task, span)

    def _see(self, task: SpanStep, span: tuple) -> None:
        """Marks the task's session as seen in the current round, most recent last."""
        session_id = id(task.caches[0])
        known = self._active.pop(session_id, None)
        refs = known[2] if known is not None and known[2][0]() is task.caches[0] else None
        self._active[session_id] = (self._rounds, span, refs or tuple(weakref.ref(c) for c in task.caches))

    def _active_sessions(self, span: tuple, by_id: dict) -> dict[int, list]:
        """This round's sessions plus those of this sub-span seen in the last ``active_rounds`` rounds that are
        still alive and have room for a token: id -> SpanCaches (at most ``max_sessions``)."""
        members = {session_id: task.caches for session_id, task in by_id.items()}
        for session_id, (seen, session_span, refs) in reversed(self._active.items()):
            if self._rounds - seen >= self.active_rounds:
                break  # older ones follow (the dict is ordered by last sighting)
            if len(members) >= self.max_sessions:
                break
            caches = [ref() for ref in refs]
            if (
                session_span == span
                and session_id not in members
                and all(c is not None for c in caches)
                and caches[0].length < caches[0].max_length
            ):
                members[session_id] = caches
        while self._active and self._rounds - next(iter(self._active.values()))[0] >= self.active_rounds:
            self._active.popitem(last=False)
        return members

    def _superset(self, span: tuple, by_id: dict) -> _Graph | None:
        """The smallest recorded round of this sub-span that has every one of these sessions, if any."""
        wanted = set(by_id)
        found = [entry for key, entry in self._graphs.items() if key[:2] == span and wanted <= set(key[2:])]
        return min(found, key=lambda entry: len(entry.sessions), default=None)

    def _seen_enough(self, key: tuple) -> bool:
        count = self._sightings.pop(key, 0) + 1
        self._sightings[key] = count
        while len(self._sightings) > self.window:
            self._sightings.popitem(last=False)
        return count >= self.record_after

    def _record(self, caches: list[list], first_block: int, key: tuple) -> _Graph:
        """Records a round of these sessions (each one's SpanCaches, one per block)."""
        n = len(caches)
        static_input = torch.zeros(n, self.hidden_size, device=self.device, dtype=self.dtype)
        positions = torch.zeros(n, dtype=torch.long, device=self.device)
        gone = lambda _, key=key: self._gone.append(key)  # noqa: E731  (a weakref callback)
        sessions = tuple(tuple(weakref.ref(cache, gone) for cache in session) for session in caches)
        pools = self._pool(caches) if n > 1 and len({session[0].max_length for session in caches}) == 1 else None
        self.recorded += 1
        if not self.capture:
            return _Graph(key, None, sessions, static_input, positions, None, pools)
        # the warm-up and the capture write keys/values at these positions; the replay that follows rewrites them
        positions.copy_(torch.tensor([session[0].length for session in caches]))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self.runner.kernels():
            self.runner.static_step(static_input, positions, caches, first_block, pools)  # warm-up: kernel choice
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self.runner.kernels():  # a private pool: a shared one breaks once a graph dies
            output = self.runner.static_step(static_input, positions, caches, first_block, pools)
        logger.debug(
            f"Recorded a decode round of {n} session(s), blocks {first_block}:{first_block + len(caches[0])}"
            + (" over pooled caches" if pools else "")
        )
        return _Graph(key, graph, sessions, static_input, positions, output, pools)

    def _pool(self, caches: list[list]) -> list[torch.Tensor]:
        """Moves these sessions' caches (same max_length) into one tensor per block, each session's buffer becoming
        a view of its row, so a round writes every session's new key/value in one kernel and attends in one call
        (per-session writes and attention calls were most of a recorded round's kernels). Graphs recorded over the
        old buffers are dropped: their memory is freed. A pool's memory goes once none of its rows is a live
        session's cache (sessions are moved out by the next pool that takes them, or end); moving briefly holds
        both copies of the moved caches."""
        moved = {id(session[0]) for session in caches}
        for key in [key for key in self._graphs if moved & set(key[2:])]:
            del self._graphs[key]
        pools = []
        for local in range(len(caches[0])):
            pool = torch.stack([session[local].buffer for session in caches])  # [n, 1 block, 2, 1 row, h, L, d]
            for row, session in enumerate(caches):
                session[local].buffer = pool[row]
            pools.append(pool.view(len(caches), *pool.shape[2:3], *pool.shape[4:]))
        return pools


@dataclass
class _PagedGraph:
    graph: torch.cuda.CUDAGraph | None
    input: torch.Tensor  # [bucket, hidden]
    positions: torch.Tensor  # [bucket] int64
    tables: torch.Tensor  # [bucket, width] int64 page ids
    output: torch.Tensor | None  # [bucket, hidden], written by the replay


class PagedDecoder:
    """Records decode rounds over a ``PagePool`` once per (sub-span, row bucket, table width) and replays them for
    any sessions that fit: the recording holds no session, only the pool, so sessions arriving and leaving cost no
    recording (``GraphedDecoder`` records per composition of sessions, ~100 ms for 16 sessions on an H100).

    A round of n sessions runs as the smallest bucket of ``BUCKETS`` >= n; the rows past n stand for no session
    (input zeros, position 0, every page the scratch page, where their throwaway key/value goes). The table width is
    the smallest power of two of pages that holds every row's next token (at most the pages of ``max_positions``
    tokens): attention gathers width * page_size keys per row, so short sessions do not pay for the longest
    possible one, at one more recording per bucket each time the longest session doubles. Eager rounds (prefills,
    prompted first steps) write the same pages through ``PagedCache``, so sessions alternate freely.

    :param runner: the family's batched runner (``pages``: it has a ``paged_step``)
    :param pool: the node's page pool, which the sessions' ``PagedCache``s live in
    :param capture: record CUDA graphs (False: run the paged step eagerly, e.g. on a CPU)
    :param max_graphs: recordings kept (least recently used dropped first)
    """

    BUCKETS = (1, 2, 4, 8, 16, 32, 64)

    def __init__(self, runner: BatchRunner, pool, *, capture: bool = True, max_graphs: int = 64):
        self.runner, self.pool, self.capture, self.max_graphs = runner, pool, capture, max_graphs
        self.device, self.dtype, self.hidden_size = runner.device, runner.dtype, runner.hidden_size
        self.max_positions = runner.static_positions
        self.enabled = self.max_positions > 0 and getattr(runner, "pages", False)
        self.max_width = pool.pages_for(self.max_positions) if self.enabled else 0
        self.max_sessions = self.BUCKETS[-1]
        self._graphs: collections.OrderedDict[tuple, _PagedGraph] = collections.OrderedDict()
        self.replays = self.recorded = 0
        if self.enabled and capture:  # builds the round's kernels now (Triton's take seconds), not in a first round
            scratch = _PagedGraph(
                None,
                torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype),
                torch.zeros(1, dtype=torch.long, device=self.device),
                torch.zeros(1, 1, dtype=torch.long, device=self.device),
                None,
            )
            with torch.inference_mode(), self.runner.kernels():
                self._step(scratch, 0, 1)  # position 0 of the scratch page: no session's keys

    def applies(self, tasks: Sequence[SpanStep]) -> bool:
        """Whether these steps run as a paged round: one token of one sequence each, every cache in this pool with
        room for the token, positions within the RoPE tables."""
        if not self.enabled or not 1 <= len(tasks) <= self.max_sessions:
            return False
        for task in tasks:
            cache = task.caches[0]
            if (
                tuple(task.hidden.shape[:2]) != (1, 1)
                or not task.batchable
                or getattr(cache, "pool", None) is not self.pool
                or not cache.length < min(cache.max_length, self.max_positions)
            ):
                return False
        return True

    def width_for(self, pages: int) -> int:
        """The table width a round whose longest row needs ``pages`` pages runs at."""
        width = 1
        while width < pages:
            width *= 2
        return min(width, self.max_width)

    @torch.inference_mode()
    def run(self, tasks: Sequence[SpanStep], first_block: int) -> list[torch.Tensor]:
        """Each task's output [1, 1, hidden], advancing its caches by one token."""
        n, num_blocks = len(tasks), len(tasks[0].caches)
        bucket = next(size for size in self.BUCKETS if size >= n)
        lengths = [task.caches[0].length for task in tasks]
        tables = [task.caches[0].table for task in tasks]
        for table, length in zip(tables, lengths):
            table.ensure(length + 1)  # the page this token goes to (within the session's reservation)
        width = self.width_for(max(len(table.pages) for table in tables))
        key = (first_block, num_blocks, bucket, width)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._record(key)
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        # one host tensor each, one copy each (few torch calls: each may wait for the GIL)
        hidden = [task.hidden.reshape(1, -1).to(self.dtype) for task in tasks]
        if bucket > n:
            hidden.append(torch.zeros(bucket - n, self.hidden_size, dtype=self.dtype))
        entry.input.copy_(hidden[0] if len(hidden) == 1 else torch.cat(hidden))
        entry.positions.copy_(torch.tensor(lengths + [0] * (bucket - n)))
        rows = [table.row(width) for table in tables] + [[0] * width] * (bucket - n)
        entry.tables.copy_(torch.tensor(rows))
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.output = self._step(entry, first_block, num_blocks)
        self.replays += 1
        for task, length in zip(tasks, lengths):
            for cache in task.caches:
                cache.length = length + 1
        return [entry.output[row : row + 1].view(1, 1, self.hidden_size) for row in range(n)]

    def _step(self, entry: _PagedGraph, first_block: int, num_blocks: int) -> torch.Tensor:
        return self.runner.paged_step(
            entry.input, entry.positions, entry.tables, self.pool.storage, first_block, num_blocks
        )

    def _record(self, key: tuple) -> _PagedGraph:
        """Records the round of ``key``'s shape; its warm-up and capture write only the scratch page (all rows at
        position 0 of tables of scratch pages)."""
        first_block, num_blocks, bucket, width = key
        entry = _PagedGraph(
            None,
            torch.zeros(bucket, self.hidden_size, device=self.device, dtype=self.dtype),
            torch.zeros(bucket, dtype=torch.long, device=self.device),
            torch.zeros(bucket, width, dtype=torch.long, device=self.device),
            None,
        )
        self.recorded += 1
        if not self.capture:
            return entry
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self.runner.kernels():
            self._step(entry, first_block, num_blocks)  # warm-up: kernel choice
        torch.cuda.current_stream().wait_stream(stream)
        entry.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(entry.graph), self.runner.kernels():
            entry.output = self._step(entry, first_block, num_blocks)
        logger.debug(f"Recorded a paged decode round: blocks {first_block}:{first_block + num_blocks}, {bucket} rows")
        return entry
