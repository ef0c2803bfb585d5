"""The stake gate's source of truth: the NodeRegistry of the deployment this ledger settles on, read from the chain.

Clients route only to nodes registered there with at least ``minStake`` bonded, under the peer id they announce
(``GET /v1/stakes``, cached for ``stake_cache_seconds``); a node asks about itself at start (``GET /v1/stakes/{a}``,
read live); the ledger refuses vouchers to a node that is not eligible (``intake``), so it never spends gas paying
one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

from nectar.wire.ledger_api import NodeStake, StakeTable

logger = logging.getLogger(__name__)


class NoChain(RuntimeError):
    """The ledger has no deployment to read stakes from."""


class StakeBook:
    """Thread-safe reader of the registry; the table is re-read at most every ``ttl`` seconds, and the Chain is rebuilt
    when the deployment file changes (a devnet restart)."""

    def __init__(self, deployment_path: Path, *, ttl: float = 10.0):
        self.deployment_path, self.ttl = Path(deployment_path), ttl
        self._lock = threading.Lock()
        self._chain = None
        self._stamp = None
        self._table: StakeTable | None = None
        self._read_at = 0.0
        self._misses: dict[str, float] = {}  # address -> when a direct read last found it ineligible
        self._direct_reads: list[float] = []  # times of the direct reads of the last second

    def chain(self):
        try:
            stamp = self.deployment_path.stat().st_mtime_ns
        except FileNotFoundError:
            raise NoChain(
                f"the ledger has no deployment file at {self.deployment_path}: start `nectar devnet` (or deploy) and "
                "set NECTAR_DEPLOYMENT, so that stakes can be read"
            ) from None
        with self._lock:
            if self._chain is None or stamp != self._stamp:
                from nectar.chain import Chain

                self._chain, self._stamp, self._table = Chain.from_deployment(self.deployment_path), stamp, None
            return self._chain

    def min_stake(self) -> int:
        return int(self.chain().registry.functions.minStake().call())

    def node(self, address: str) -> NodeStake:
        """One node, read now."""
        chain = self.chain()
        info = chain.node_info(address)
        return NodeStake(
            address=chain.w3.to_checksum_address(address),
            registered=bool(info["registered"]),
            peer_id=str(info["peerId"]),
            bonded=int(info["bonded"]),
            unbonding=int(info["unbonding"]),
            unlock_at=int(info["unlockAt"]),
            min_stake=self.min_stake(),
        )

    def table(self, *, max_age: float | None = None) -> StakeTable:
        """Every node that ever registered; at most ``max_age`` (default ``ttl``) seconds old."""
        chain = self.chain()
        max_age = self.ttl if max_age is None else max_age
        with self._lock:
            if self._table is not None and time.monotonic() - self._read_at < max_age:
                return self._table
        min_stake = self.min_stake()
        nodes = {}
        for n in chain.registered_nodes():
            stake = NodeStake(
                address=n["node"],
                registered=bool(n["registered"]),
                peer_id=str(n["peerId"]),
                bonded=int(n["bonded"]),
                unbonding=int(n["unbonding"]),
                unlock_at=int(n["unlockAt"]),
                min_stake=min_stake,
            )
            nodes[stake.address.lower()] = stake
        table = StakeTable(min_stake, nodes, time.time())
        with self._lock:
            self._table, self._read_at = table, time.monotonic()
        return table

    def eligible(self, address: str) -> bool:
        """From the cached table; a miss re-reads it if over a second old, so a node that just registered is paid
        at once while a flood of vouchers to unregistered nodes costs at most one chain read a second."""
        entry = self.table().get(address)
        if entry is None or not entry.eligible:
            entry = self.table(max_age=1.0).get(address)
        if entry is not None and entry.eligible:
            return True
        return self._read_directly(address)

    def _read_directly(self, address: str, *, per_second: int = 20) -> bool:
        """A miss the cached table may not know yet (a node that registered within the second after the last read):
        one direct read, at most once a second per address and ``per_second`` in all (a flood of unregistered
        addresses then gets the table's answer)."""
        key, now = address.lower(), time.monotonic()
        with self._lock:
            self._direct_reads = [t for t in self._direct_reads if now - t < 1.0]
            if now - self._misses.get(key, float("-inf")) < 1.0 or len(self._direct_reads) >= per_second:
                return False
            self._direct_reads.append(now)
        eligible = self.node(address).eligible
        with self._lock:
            if eligible:
                self._misses.pop(key, None)
            else:
                if len(self._misses) >= 10_000:
                    self._misses.clear()
                self._misses[key] = now
        return eligible


class ReadsBusy(RuntimeError):
    """Chain reads for uncached keys are over their global rate: the caller retries in a second."""


class ReadCache:
    """Answers of chain reads that anyone may ask for (``GET /v1/backing/...``, ``GET /v1/stakes/{a}``): each kept
    ``ttl`` seconds per key (at most ``max_keys``, the oldest dropped), one read in flight per key (concurrent askers
    wait for it), and reads for keys not cached at most ``per_second`` in all (a token bucket of that burst), so an
    outsider can make the ledger read the chain at most once per key and ``ttl``, and ``per_second`` times overall.
    ``fresh`` (the operator's, checked by the route) reads now, outside the bucket."""

    def __init__(
        self,
        *,
        ttl: float = 2.0,
        max_keys: int = 10_000,
        per_second: float = 20.0,
        clock=time.monotonic,
    ):
        self.ttl, self.max_keys, self.per_second, self.clock = ttl, max_keys, per_second, clock
        self._entries: OrderedDict = OrderedDict()  # key -> (read at, value), oldest first
        self._inflight: dict = {}  # key -> Event set when its read ends
        self._tokens, self._filled_at = per_second, clock()
        self._lock = threading.Lock()

    def get(self, key, read, *, fresh: bool = False):
        while True:
            with self._lock:
                now = self.clock()
                hit = self._entries.get(key)
                if hit is not None and not fresh and now - hit[0] < self.ttl:
                    return hit[1]
                waiting = self._inflight.get(key)
                if waiting is None:
                    if not fresh:
                        self._tokens = min(self.per_second, self._tokens + (now - self._filled_at) * self.per_second)
                        self._filled_at = now
                        if self._tokens < 1.0:
                            raise ReadsBusy(
                                f"the ledger reads the chain for at most {self.per_second:g} new keys a second and "
                                "that is spent now: retry in a second"
                            )
                        self._tokens -= 1.0
                    done = self._inflight[key] = threading.Event()
                    break
            waiting.wait(30.0)  # another asker's read of this key: take its answer (or read ourselves if it failed)
            fresh = False
        try:
            value = read()
            with self._lock:
                self._entries.pop(key, None)
                self._entries[key] = (self.clock(), value)
                while len(self._entries) > self.max_keys:
                    self._entries.popitem(last=False)
            return value
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            done.set()
