"""The client's view of the swarm and its route finding.

Inference routes minimise total time: a shortest path over block boundaries where a hop costs its measured round
trip plus its blocks' compute time, times the scorer's factor, and hops without enough free KV cache are skipped.
Forward/backward routes are drawn at random in proportion to throughput, which spreads training load.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time

from hivemind.p2p import PeerID

from nectar.client.config import ClientConfig
from nectar.client.routing.scoring import NoScorer, PeerScorer
from nectar.client.routing.spans import RemoteSpan
from nectar.wire.announce import ServerInfo, ServerState
from nectar.wire.swarm import read_swarm

logger = logging.getLogger(__name__)


class MissingBlocksError(RuntimeError):
    def __init__(self, blocks: list[int], model_id: str, unstaked: dict[str, str] | None = None):
        shown = ", ".join(map(str, blocks[:10])) + (" ..." if len(blocks) > 10 else "")
        gated = ""
        if unstaked:
            listed = "; ".join(f"{peer}: {why}" for peer, why in list(unstaked.items())[:5])
            gated = (
                f" {len(unstaked)} online node(s) there are left out by the stake gate ({listed}): their operators "
                "run `nectar operator register`, or pass --no-require-stake for a private swarm."
            )
        super().__init__(
            f"No online node serves blocks {shown} of {model_id}.{gated} Start one with "
            f"`nectar node --model {model_id} --blocks {blocks[0]}:{blocks[-1] + 1} --initial-peers ...`, "
            "or check `nectar swarm` for what is online."
        )
        self.blocks, self.unstaked = blocks, dict(unstaked or {})


class RemoteSequenceManager:
    """Knows which peers host which blocks of one model; thread-safe."""

    def __init__(
        self, runtime, model_id: str, num_blocks: int, *, config: ClientConfig, scorer: PeerScorer | None = None
    ):
        """:param runtime: the ``ClientRuntime`` (nectar.wire.dht) the swarm is read through and peers are pinged on"""
        self.runtime, self.model_id, self.num_blocks, self.config = runtime, model_id, num_blocks, config
        self.scorer = scorer or NoScorer()
        self._latency: dict[PeerID, float] = {}
        self._servers: dict[int, dict[PeerID, ServerInfo]] = {}
        self._updated = 0.0
        self._banned_until: dict[PeerID, float] = {}
        self._ban_length: dict[PeerID, float] = {}
        self._unstaked: dict[str, str] = {}  # peers the stake gate left out of the last routes, with why
        self._lock = threading.Lock()

    # ---- swarm view -------------------------------------------------------------------------------------------

    def update(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._updated < self.config.update_period:
            return
        servers = read_swarm(self.runtime, self.model_id, self.num_blocks).blocks
        with self._lock:
            self._servers, self._updated = servers, time.monotonic()
        self._measure_latencies({peer: info for block in servers.values() for peer, info in block.items()})

    def _measure_latencies(self, peers: dict) -> None:
        """Round-trip times to peers not measured yet (one info RPC each on the lane steps will use, concurrently,
        bounded by 2 s)."""
        new = [peer for peer in peers if peer not in self._latency]
        if self.runtime is None or not new:
            return
        import asyncio

        from nectar.wire.stubs import call_info

        async def ping(peer):
            began = time.perf_counter()
            try:
                await call_info(self.runtime.p2p, peer, peers[peer], direct=self.config.direct, timeout=2)
                return peer, time.perf_counter() - began
            except Exception:
                return peer, None

        async def ping_all():
            return await asyncio.gather(*(ping(peer) for peer in new))

        try:
            for peer, rtt in self.runtime.run(ping_all(), timeout=5):
                if rtt is not None:
                    self._latency[peer] = rtt
        except Exception:
            logger.debug("Latency measurement failed", exc_info=True)

    def latency(self, peer_id: PeerID) -> float:
        """Measured round trip to ``peer_id`` in seconds (the configured hop cost if unknown)."""
        return self._latency.get(peer_id, self.config.hop_cost)

    def servers(self) -> dict[int, dict[PeerID, ServerInfo]]:
        self.update()
        return self._servers

    def ban(self, peer_id: PeerID, reason: str = "") -> None:
        with self._lock:
            length = min(self._ban_length.get(peer_id, self.config.min_backoff / 2) * 2, self.config.max_backoff)
            self._ban_length[peer_id] = length
            self._banned_until[peer_id] = time.monotonic() + length
        logger.warning(f"Avoiding peer {peer_id} for {length:.1f}s: {reason}")

    def mark_ok(self, peer_id: PeerID) -> None:
        self._ban_length.pop(peer_id, None)

    def is_banned(self, peer_id: PeerID) -> bool:
        return self._banned_until.get(peer_id, 0) > time.monotonic()

    def _candidates(self, start: int, end: int) -> dict[PeerID, ServerInfo]:
        """Usable peers whose span intersects [start, end): online, not banned, and through the scorer's stake gate
        (the others are kept in ``_unstaked`` for the error that names them)."""
        found: dict[PeerID, ServerInfo] = {}
        for index in range(start, end):
            for peer_id, info in self.servers().get(index, {}).items():
                if info.state == ServerState.ONLINE and not self.is_banned(peer_id):
                    if self.scorer.eligible(peer_id, info):
                        found[peer_id] = info
                    else:
                        self._unstaked[str(peer_id)] = self.scorer.ineligible_reason(peer_id, info)
        return found

    def _missing(self, start: int, end: int, candidates) -> list[int]:
        covered = set()
        for info in candidates.values():
            covered.update(range(max(start, info.start), min(end, info.end)))
        return [i for i in range(start, end) if i not in covered]

    # ---- routes -----------------------------------------------------------------------------------------------

    def _begin_route(self) -> None:
        begin = getattr(self.scorer, "begin_route", None)  # scorers that explore draw anew per route
        if begin is not None:
            begin()

    def _hop_cost(self, peer_id: PeerID, info: ServerInfo, blocks: int) -> float:
        compute = blocks / max(info.throughput, 1e-9)
        return (self.latency(peer_id) + compute) * self.scorer.cost_factor(peer_id, info)

    def make_inference_route(
        self, start: int = 0, end: int | None = None, *, cache_tokens: int = 0, exclude: tuple = ()
    ) -> list[RemoteSpan]:
        end = self.num_blocks if end is None else end
        self._begin_route()
        self._unstaked = {}
        for attempt in range(2):
            candidates = {p: i for p, i in self._candidates(start, end).items() if p not in exclude}
            usable = {p: i for p, i in candidates.items() if i.cache_tokens_left >= cache_tokens} or candidates
            route = self._shortest_path(start, end, usable)
            if route is not None:
                if self.config.show_route:
                    logger.info(f"Route for blocks {start}:{end}: {route}")
                return route
            self.update(force=True)  # the view may be stale: refresh once before giving up
        missing = self._missing(start, end, candidates) or list(range(start, end))
        raise MissingBlocksError(missing, self.model_id, self._unstaked)

    def _shortest_path(self, start: int, end: int, peers: dict[PeerID, ServerInfo]) -> list[RemoteSpan] | None:
        best = {start: 0.0}
        previous: dict[int, tuple[int, PeerID]] = {}
        heap = [(0.0, start)]
        while heap:
            cost, block = heapq.heappop(heap)
            if block == end:
                break
            if cost > best.get(block, float("inf")):
                continue
            for peer_id, info in peers.items():
                if not (info.start <= block < info.end):
                    continue
                for stop in range(block + 1, min(info.end, end) + 1):
                    new_cost = cost + self._hop_cost(peer_id, info, stop - block)
                    if new_cost < best.get(stop, float("inf")) - 1e-12:
                        best[stop] = new_cost
                        previous[stop] = (block, peer_id)
                        heapq.heappush(heap, (new_cost, stop))
        if end not in previous and start != end:
            return None
        route, block = [], end
        while block != start:
            begin, peer_id = previous[block]
            route.append(RemoteSpan(peer_id, begin, block, peers[peer_id]))
            block = begin
        return route[::-1]

    def make_training_route(self, start: int = 0, end: int | None = None) -> list[RemoteSpan]:
        """Throughput-proportional random choice, hop by hop, each hop as long as its server allows."""
        end = self.num_blocks if end is None else end
        self._begin_route()
        self._unstaked = {}
        candidates = self._candidates(start, end)
        route, block = [], start
        while block < end:
            here = [(p, i) for p, i in candidates.items() if i.start <= block < i.end]
            if not here:
                self.update(force=True)
                raise MissingBlocksError(
                    self._missing(block, end, self._candidates(block, end)) or [block], self.model_id, self._unstaked
                )
            weights = [i.throughput / self.scorer.cost_factor(p, i) for p, i in here]
            peer_id, info = random.choices(here, weights=weights)[0]
            stop = min(info.end, end)
            route.append(RemoteSpan(peer_id, block, stop, info))
            block = stop
        return route
