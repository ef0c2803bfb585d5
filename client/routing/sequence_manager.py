"""The client's view of the swarm and its route finding.

Inference routes minimise total time: a shortest path over block boundaries where a hop costs its measured round
trip plus its blocks' compute time, times the scorer's factor, and hops without enough free KV cache are skipped.
Forward/backward routes are drawn at random in proportion to throughput, which spreads training load.

Routing measures before it trusts (issue 22): a record is a peer's claim, so

- a hop's throughput is the announced one capped by what this client observed of the peer (``observe``), and for a
  peer not observed yet by the lowest throughput announced by a peer that answered our ping: nobody is believed
  faster than the slowest reachable node until it has shown it;
- a peer not pinged yet counts as ``UNMEASURED_LATENCY`` away (``RELAY_LATENCY`` more if its record says it is
  relayed: an extra hop, which a ping then measures), one whose ping failed as a connect timeout away, so a lane
  that accepts and never answers is tried last, not first;
- a ban lasts at least the connect timeout (a failure that took a timeout to show must not expire before the retry
  that would hit it again) and doubles per peer until the peer serves a step well (``mark_ok``); after it, the peer
  counts as unreachable until a new ping (``REPING_AFTER``) answers;
- a peer that failed a session (a ban) carries a failure score, ``fails / (fails + served + 1)`` over decaying counts
  (half-life ``FAILURE_HALF_LIFE``), and each of its hops costs that times the step timeout more: a sybil that answers
  pings fast but black-holes or errors on steps loses its ties for good after one failure, where a ban alone ends and
  a fresh ping made it the cheapest hop again; an honest node that served many steps barely notices one failure;
- a peer's direct lane is dialled only after the peer answered over P2P (which authenticates its id) and only if the
  lane's host is one the P2P daemon reaches the peer at (``nectar.wire.swarm.lane_on_peer_host``); otherwise routes
  use its P2P address, so a record cannot aim clients at an arbitrary host and port;
- a peer whose record's Ethereum address is not proven (``nectar.wire.swarm`` blanks it) is never routed to: it
  could not be paid, and could not be held to stake or reputation.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import random
import threading
import time

from hivemind.p2p import PeerID

from nectar.client.config import ClientConfig
from nectar.client.pricing import RouteTooExpensiveError, route_price
from nectar.client.routing.scoring import NoScorer, PeerScorer
from nectar.client.routing.spans import RemoteSpan
from nectar.wire.announce import ServerInfo, ServerState
from nectar.wire.protocol import NodeRPCError, adapter_name
from nectar.wire.swarm import read_swarm

logger = logging.getLogger(__name__)

UNMEASURED_LATENCY = 0.5  # s assumed for a peer not pinged yet (a record's claims are not evidence)
RELAY_LATENCY = 0.25  # s more for an unmeasured relayed peer: a round trip through its relay on top of its own
PING_TIMEOUT = 2.0  # s a latency ping may take; a peer that misses it counts as a connect timeout away
REPING_AFTER = 60.0  # s before a peer whose ping failed is pinged again (each try may cost PING_TIMEOUT)
MAX_TRACKED_PEERS = 4096  # bans, pings and observations kept (sybils can mint peer ids without end)
OBSERVED_WEIGHT = 0.3  # weight of the newest observation in a peer's throughput average
FAILURE_HALF_LIFE = 1800.0  # s over which a peer's failure and success counts halve (slow: sybils wait out less)


class MissingBlocksError(RuntimeError):
    def __init__(
        self, blocks: list[int], model_id: str, unstaked: dict[str, str] | None = None, adapter: str | None = None
    ):
        shown = ", ".join(map(str, blocks[:10])) + (" ..." if len(blocks) > 10 else "")
        gated = ""
        if unstaked:
            listed = "; ".join(f"{peer}: {why}" for peer, why in list(unstaked.items())[:5])
            gated = (
                f" {len(unstaked)} online node(s) there are left out ({listed}). Left out by the stake gate: their "
                "operators run `nectar operator register`, or pass --no-require-stake for a private swarm; by "
                "--quant: allow their weights' quantization."
            )
        pinned = " A Hub model's id names its commit: nodes on another revision serve another id." * ("@" in model_id)
        with_adapter = f" with adapter {adapter!r}" if adapter else ""
        serve = f" --adapters FOLDER/{adapter}" if adapter else ""
        super().__init__(
            f"No online node serves blocks {shown} of {model_id}{with_adapter}.{gated} Start one with "
            f"`nectar node --model {model_id} --blocks {blocks[0]}:{blocks[-1] + 1}{serve} --initial-peers ...`, "
            "or check `nectar swarm` for what is online." + pinned
        )
        self.blocks, self.unstaked = blocks, dict(unstaked or {})


class RemoteSequenceManager:
    """Knows which peers host which blocks of one model; thread-safe."""

    def __init__(
        self,
        runtime,
        model_id: str,
        num_blocks: int,
        *,
        config: ClientConfig,
        scorer: PeerScorer | None = None,
        active_adapter: str | None = None,
    ):
        """:param runtime: the ``ClientRuntime`` (nectar.wire.dht) the swarm is read through and peers are pinged on
        :param active_adapter: a LoRA adapter's name: routes use only nodes whose record lists it"""
        self.runtime, self.model_id, self.num_blocks, self.config = runtime, model_id, num_blocks, config
        try:
            self.active_adapter = adapter_name(active_adapter)
        except NodeRPCError as e:  # a name, never a path: nodes serve only the folders their operators listed
            raise ValueError(f"active_adapter: {e.message}") from None
        self.scorer = scorer or NoScorer()
        self._latency: dict[PeerID, float] = {}
        self._ping_failed: dict[PeerID, float] = {}  # peer -> monotonic time its last ping failed
        self._observed: dict[PeerID, float] = {}  # peer -> throughput (block-tokens/s) this client saw it deliver
        self._servers: dict[int, dict[PeerID, ServerInfo]] = {}
        self._updated = 0.0
        self._banned_until: dict[PeerID, float] = {}
        self._ban_length: dict[PeerID, float] = {}
        self._unstaked: dict[str, str] = {}  # peers the stake gate left out of the last routes, with why
        self._record: dict[PeerID, list[float]] = {}  # peer -> [failures, steps served, monotonic time], decaying
        self._lanes: dict[PeerID, str] = {}  # peer -> the direct lane checked to be on its P2P host
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
        """Round-trip times to peers not measured yet, concurrently, bounded by 2 s: an info RPC over P2P first (which
        authenticates the peer id), then, if the record names a direct lane on a host the P2P daemon reaches the peer
        at, one on that lane (what steps will use)."""
        now = time.monotonic()
        new = [
            peer
            for peer in peers
            if peer not in self._latency and now - self._ping_failed.get(peer, -REPING_AFTER) >= REPING_AFTER
        ]
        if self.runtime is None or not new:
            return
        import asyncio

        from nectar.wire.stubs import call_info
        from nectar.wire.swarm import lane_on_peer_host

        async def ping(peer):
            p2p, lane = self.runtime.p2p, peers[peer].direct_address
            began = time.perf_counter()
            try:
                await call_info(p2p, peer, None, direct=False, timeout=PING_TIMEOUT)
            except Exception:
                return peer, None, ""
            rtt = time.perf_counter() - began
            if not (self.config.direct and lane and await lane_on_peer_host(p2p, peer, lane)):
                return peer, rtt, ""
            began = time.perf_counter()
            try:
                await call_info(p2p, peer, peers[peer], direct=True, timeout=PING_TIMEOUT)
                return peer, time.perf_counter() - began, lane
            except Exception:
                return peer, rtt, ""

        async def ping_all():
            return await asyncio.gather(*(ping(peer) for peer in new))

        try:
            results = self.runtime.run(ping_all(), timeout=PING_TIMEOUT + 3)
        except Exception:
            logger.debug("Latency measurement failed", exc_info=True)
            results = [(peer, None, "") for peer in new]
        with self._lock:
            for peer, rtt, lane in results:
                if rtt is not None:
                    self._latency[peer] = rtt
                    self._ping_failed.pop(peer, None)
                else:
                    self._ping_failed[peer] = time.monotonic()
                if lane:
                    self._lanes[peer] = lane
                else:
                    self._lanes.pop(peer, None)
            for table in (self._latency, self._ping_failed, self._observed, self._lanes):
                _bound(table)

    def latency(self, peer_id: PeerID, info: ServerInfo | None = None) -> float:
        """Measured round trip to ``peer_id`` in seconds (through its relay, if relayed); a connect timeout if its
        ping failed; else at least ``UNMEASURED_LATENCY`` (or the configured hop cost, if larger), plus
        ``RELAY_LATENCY`` if its record says it is relayed (an extra hop no ping has priced yet)."""
        measured = self._latency.get(peer_id)
        if measured is not None:
            return measured
        if peer_id in self._ping_failed:
            return max(self.config.connect_timeout, PING_TIMEOUT)
        relay = RELAY_LATENCY if info is not None and info.relayed else 0.0
        return max(self.config.hop_cost, UNMEASURED_LATENCY) + relay

    def observe(self, peer_id: PeerID, block_tokens: int, seconds: float) -> None:
        """Records that ``peer_id`` took ``seconds`` (round trip included) for ``block_tokens`` tokens x blocks."""
        if block_tokens <= 0 or not seconds > 0:
            return
        rate = block_tokens / seconds
        with self._lock:
            old = self._observed.get(peer_id)
            self._observed[peer_id] = rate if old is None else (1 - OBSERVED_WEIGHT) * old + OBSERVED_WEIGHT * rate
            _bound(self._observed)

    def _decayed(self, peer_id: PeerID) -> list[float]:
        """The peer's [failures, steps served, time] with both counts decayed to now (call under the lock)."""
        now = time.monotonic()
        record = self._record.get(peer_id)
        if record is None:
            record = self._record[peer_id] = [0.0, 0.0, now]
            _bound(self._record)
        keep = math.pow(0.5, (now - record[2]) / FAILURE_HALF_LIFE)
        record[0], record[1], record[2] = record[0] * keep, record[1] * keep, now
        return record

    def failure_rate(self, peer_id: PeerID) -> float:
        """How often ``peer_id`` failed this client lately: failures / (failures + steps served + 1), decayed."""
        with self._lock:
            if peer_id not in self._record:
                return 0.0
            failures, served, _ = self._decayed(peer_id)
        return failures / (failures + served + 1)

    def throughput(self, peer_id: PeerID, info: ServerInfo, unmeasured_cap: float | None = None) -> float:
        """The throughput routing believes: the announced one, capped by what this client observed of the peer, or
        (not observed yet) by ``unmeasured_cap``."""
        announced = max(float(info.throughput), 1e-9)
        observed = self._observed.get(peer_id)
        if observed is not None:
            return min(announced, max(observed, 1e-9))
        return announced if unmeasured_cap is None else min(announced, unmeasured_cap)

    def _unmeasured_cap(self, peers: dict[PeerID, ServerInfo]) -> float | None:
        """What an unobserved peer is believed to deliver at most: the lowest throughput believed of a peer that served
        this client steps (a ping costs nothing to answer fast: only real steps are evidence), else the lowest announced
        by a peer that answered our ping, else by any peer."""
        served = [self.throughput(p, i) for p, i in peers.items() if p in self._observed]
        if served:
            return max(min(served), 1e-9)
        reachable = [float(i.throughput) for p, i in peers.items() if p in self._latency or p in self._observed]
        announced = reachable or [float(i.throughput) for i in peers.values()]
        return max(min(announced), 1e-9) if announced else None

    def servers(self) -> dict[int, dict[PeerID, ServerInfo]]:
        self.update()
        return self._servers

    def ban(self, peer_id: PeerID, reason: str = "", *, timeout: float | None = None) -> None:
        """Avoids ``peer_id`` for at least ``timeout`` (default: the connect timeout, the longest a failed open waits)
        and at least twice its previous ban, up to ``max_backoff`` (or ``timeout``, if longer); remembered until the
        peer serves a step well (``mark_ok``), so a peer that fails again and again is avoided longer each time."""
        floor = max(self.config.connect_timeout if timeout is None else timeout, self.config.min_backoff)
        with self._lock:
            self._decayed(peer_id)[0] += 1
            previous = self._ban_length.get(peer_id)
            length = self.config.min_backoff if previous is None else 2 * previous
            length = min(max(length, floor), max(self.config.max_backoff, floor))
            self._ban_length[peer_id] = length
            self._banned_until[peer_id] = time.monotonic() + length
            # after its ban, it counts as unreachable until a new ping answers: a peer that accepts and never
            # answers must not come back as the cheapest hop
            self._latency.pop(peer_id, None)
            self._ping_failed[peer_id] = time.monotonic()
            _bound(self._ping_failed)
            _bound(self._ban_length)
            _bound(self._banned_until)
        logger.warning(f"Avoiding peer {peer_id} for {length:.1f}s: {reason}")

    def mark_ok(self, peer_id: PeerID) -> None:
        """``peer_id`` served a step whose receipt passed the client's checks."""
        with self._lock:
            self._ban_length.pop(peer_id, None)
            self._decayed(peer_id)[1] += 1

    def is_banned(self, peer_id: PeerID) -> bool:
        return self._banned_until.get(peer_id, 0) > time.monotonic()

    def _candidates(self, start: int, end: int) -> dict[PeerID, ServerInfo]:
        """Usable peers whose span intersects [start, end): online, not banned, serving weights of a quantization the
        client allows (``ClientConfig.quant``) and through the scorer's stake gate (the others are kept in
        ``_unstaked`` for the error that names them)."""
        found: dict[PeerID, ServerInfo] = {}
        allowed_text = self.config.quant.replace(" ", "")
        allowed = {q for q in allowed_text.split(",") if q}
        for index in range(start, end):
            for peer_id, info in self.servers().get(index, {}).items():
                if info.state == ServerState.ONLINE and not self.is_banned(peer_id):
                    if self.active_adapter is not None and self.active_adapter not in info.adapters:
                        continue  # it would compute the base model (or refuse): never routed to for this adapter
                    if allowed and info.quant not in allowed:
                        self._unstaked[str(peer_id)] = f"it serves {info.quant} weights (--quant allows {allowed_text})"
                    elif not info.eth_address:
                        self._unstaked[str(peer_id)] = (
                            "its record's Ethereum address is not proven by a signature over its peer id"
                        )
                    elif self.scorer.eligible(peer_id, info):
                        lane = self._lanes.get(peer_id)
                        if info.direct_address and info.direct_address != lane:  # not checked: P2P only
                            info = dataclasses.replace(info, direct_address="")
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

    def _hop_cost(self, peer_id: PeerID, info: ServerInfo, blocks: int, cap: float | None = None) -> float:
        compute = blocks / self.throughput(peer_id, info, cap)
        expected_loss = self.failure_rate(peer_id) * self.config.step_timeout  # what a try there may waste
        return (self.latency(peer_id, info) + compute + expected_loss) * self.scorer.cost_factor(peer_id, info)

    def make_inference_route(
        self,
        start: int = 0,
        end: int | None = None,
        *,
        cache_tokens: int = 0,
        exclude: tuple = (),
        max_price: int | None = None,
    ) -> list[RemoteSpan]:
        """The fastest route over blocks [start, end); with ``max_price`` (credit wei per token over these blocks),
        the fastest one within it, else the cheapest one if that is (``RouteTooExpensiveError`` if none is)."""
        end = self.num_blocks if end is None else end
        self._begin_route()
        self._unstaked = {}
        for attempt in range(2):
            candidates = {p: i for p, i in self._candidates(start, end).items() if p not in exclude}
            usable = {p: i for p, i in candidates.items() if i.cache_tokens_left >= cache_tokens} or candidates
            route = self._shortest_path(start, end, usable)
            if route is not None and max_price is not None and route_price(route) > max_price:
                route = self._cheapest_within(start, end, usable, max_price)
            if route is not None:
                if self.config.show_route:
                    logger.info(f"Route for blocks {start}:{end}: {route}")
                return route
            self.update(force=True)  # the view may be stale: refresh once before giving up
        missing = self._missing(start, end, candidates) or list(range(start, end))
        raise MissingBlocksError(missing, self.model_id, self._unstaked, self.active_adapter)

    def _shortest_path(
        self, start: int, end: int, peers: dict[PeerID, ServerInfo], cost=None
    ) -> list[RemoteSpan] | None:
        """Dijkstra over block boundaries; a hop costs ``cost(peer_id, info, blocks)`` (default: its time)."""
        cap = self._unmeasured_cap(peers)
        cost_of = cost or (lambda peer_id, info, blocks: self._hop_cost(peer_id, info, blocks, cap))
        costs: dict[tuple[PeerID, int], float] = {}  # one scorer call per (peer, length): the scorer may draw
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
                    key = (peer_id, stop - block)
                    if key not in costs:
                        costs[key] = cost_of(peer_id, info, stop - block)
                    new_cost = cost + costs[key]
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

    def _cheapest_within(self, start: int, end: int, peers: dict[PeerID, ServerInfo], max_price: int):
        """The cheapest route over [start, end) (by announced price x blocks); raises ``RouteTooExpensiveError`` if
        even that costs more than ``max_price`` per token."""
        fastest = self._shortest_path(
            start, end, peers, cost=lambda peer_id, info, blocks: max(int(info.price_per_token), 0) * blocks
        )
        price = route_price(fastest or [])
        if fastest is None or price > max_price:
            raise RouteTooExpensiveError(
                f"The cheapest route over blocks {start}:{end} of {self.model_id} costs {price} credit wei per token "
                f"(the sum of its nodes' announced price x blocks), above the {max_price} allowed (the operator's "
                "cap, or the budget left per token). Retry when cheaper nodes serve these blocks (`nectar swarm` "
                "lists prices), or allow a higher price.",
                price=price,
                cap=max_price,
            )
        return fastest

    def make_training_route(self, start: int = 0, end: int | None = None) -> list[RemoteSpan]:
        """Throughput-proportional random choice, hop by hop, each hop as long as its server allows."""
        end = self.num_blocks if end is None else end
        self._begin_route()
        self._unstaked = {}
        candidates = self._candidates(start, end)
        cap = self._unmeasured_cap(candidates)
        route, block = [], start
        while block < end:
            here = [(p, i) for p, i in candidates.items() if i.start <= block < i.end]
            if not here:
                self.update(force=True)
                raise MissingBlocksError(
                    self._missing(block, end, self._candidates(block, end)) or [block],
                    self.model_id,
                    self._unstaked,
                    self.active_adapter,
                )
            weights = [
                self.throughput(p, i, cap) * (1 - self.failure_rate(p)) / self.scorer.cost_factor(p, i) for p, i in here
            ]
            peer_id, info = random.choices(here, weights=weights)[0]
            stop = min(info.end, end)
            route.append(RemoteSpan(peer_id, block, stop, info))
            block = stop
        return route


def _bound(table: dict) -> None:
    """Keeps a per-peer table under ``MAX_TRACKED_PEERS`` by dropping its oldest entries."""
    while len(table) > MAX_TRACKED_PEERS:
        del table[next(iter(table))]
