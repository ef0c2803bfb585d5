"""The KV-cache budget of a node: sessions reserve bytes up front and get a clear error when the budget is spent.

Each client (a verified address, issue 22) may hold at most ``client_share`` of the budget and ``client_sessions``
sessions at once, so one client cannot lock the others out; clients nothing backs share one such allowance (and
give way to backed ones); a held session is freed once idle (no paid step) for the session timeout
(``nectar.node.inference_stream``)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Callable

from nectar.wire.protocol import ErrorCode, NodeRPCError

logger = logging.getLogger(__name__)


class _Hold:
    __slots__ = ("nbytes", "client", "evict", "released")

    def __init__(self, nbytes: int, client: str | None, evict: Callable[[], None] | None):
        self.nbytes, self.client, self.evict, self.released = nbytes, client, evict, False


UNBACKED = "<unbacked>"  # the key all clients on the free allowance share, so rotating addresses multiplies nothing


class MemoryCache:
    """Tracks reserved KV-cache bytes. Reservation happens before any tensor is allocated, so a full node never OOMs.

    Sessions of clients that pay on the node-wide free allowance (``backed=False``: no escrow, not trusted) count
    together as one client, capped at ``unbacked_share`` of the budget and ``client_sessions`` sessions, whatever
    addresses they use; and a backed or trusted client that finds the cache full reclaims their oldest sessions first
    (each is ended through its ``evict`` callback). Its bytes count as free at once: the evicted session drops its
    tensors after the step it may be computing, so the budget can be exceeded by at most ``unbacked_share`` briefly.

    :param max_bytes: total budget for all sessions' caches
    :param bytes_per_token: cache bytes one token of one sequence costs across the whole hosted span
    :param client_share: the most of ``max_bytes`` one client may hold at once
    :param client_sessions: the most sessions one client may hold at once
    :param unbacked_share: the most of ``max_bytes`` all unbacked clients together may hold at once
    """

    def __init__(
        self,
        max_bytes: int,
        bytes_per_token: int,
        *,
        client_share: float = 1.0,
        client_sessions: int = 0,
        unbacked_share: float = 1.0,
    ):
        self.max_bytes = max_bytes
        self.bytes_per_token = max(1, bytes_per_token)
        self.client_bytes = int(max_bytes * min(1.0, max(0.0, client_share)))
        self.unbacked_bytes = int(max_bytes * min(1.0, max(0.0, unbacked_share)))
        self.client_sessions = client_sessions  # 0: no cap
        self._used = 0
        self._by_client: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # client -> [bytes, sessions]
        self._unbacked: dict[_Hold, None] = {}  # unbacked sessions' holds, oldest first
        self._lock = threading.Lock()
        self.evicted = 0  # unbacked sessions ended to make room for backed ones

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def tokens_left(self) -> int:
        return max(0, self.max_bytes - self._used) // self.bytes_per_token

    def held_by(self, client: str) -> tuple[int, int]:
        """(bytes, sessions) ``client`` holds now (``UNBACKED``: all unbacked clients together)."""
        with self._lock:
            held = self._by_client.get(client)
            return (held[0], held[1]) if held else (0, 0)

    def _check_client(self, key: str, nbytes: int, limit: int, who: str) -> None:
        held = self._by_client.get(key, (0, 0))
        if self.client_sessions and held[1] >= self.client_sessions:
            raise NodeRPCError(
                ErrorCode.CACHE_FULL,
                f"{who}: {held[1]} sessions held at this node, the most at once; close one (or let it expire) "
                "before opening another",
            )
        if held[0] + nbytes > limit:
            raise NodeRPCError(
                ErrorCode.CACHE_FULL,
                f"{who}: this session would make {_size(held[0] + nbytes)} of this node's KV cache held, "
                f"more than the {_size(limit)} allowed; close a session, use a shorter max_length, or route "
                "through another node",
            )

    def _account(self, hold: _Hold, sign: int) -> None:
        self._used += sign * hold.nbytes
        keys = [hold.client] if hold.client is not None else []
        if hold.evict is not None:
            keys.append(UNBACKED)
        for key in keys:
            held = self._by_client[key]
            held[0] += sign * hold.nbytes
            held[1] += sign
            if held[1] <= 0:
                self._by_client.pop(key, None)

    def _release(self, hold: _Hold) -> None:
        if not hold.released:
            hold.released = True
            self._account(hold, -1)
            self._unbacked.pop(hold, None)

    @contextlib.contextmanager
    def reserve(
        self, nbytes: int, client: str | None = None, *, backed: bool = True, evict: Callable[[], None] | None = None
    ):
        """Holds ``nbytes`` for one session of ``client``. ``backed=False`` (its steps come out of the free
        allowance): it counts against the unbacked share too, and ``evict`` ends the session when a backed client
        needs its room."""
        if not backed and evict is None:
            raise ValueError("an unbacked session needs an evict callback")
        hold = _Hold(nbytes, client, None if backed else evict)
        evicted = []
        with self._lock:
            if client is not None:
                self._check_client(client, nbytes, self.client_bytes, f"client {client}")
            if not backed:
                self._check_client(
                    UNBACKED, nbytes, self.unbacked_bytes, "clients without escrow or trust here (all of them together)"
                )
            free = self.max_bytes - self._used
            if backed and nbytes > free and nbytes <= free + sum(h.nbytes for h in self._unbacked):
                for old in list(self._unbacked):  # the oldest first, until the session fits
                    if nbytes <= self.max_bytes - self._used:
                        break
                    self._release(old)
                    evicted.append(old)
            if nbytes > self.max_bytes - self._used:
                raise NodeRPCError(
                    ErrorCode.CACHE_FULL,
                    f"node busy: the session needs {_size(nbytes)} of KV cache but only "
                    f"{_size(self.max_bytes - self._used)} of {_size(self.max_bytes)} are free; "
                    "retry later, use a shorter max_length, or route through another node",
                )
            self._account(hold, +1)
            if not backed:
                self._unbacked[hold] = None
            self.evicted += len(evicted)
        for old in evicted:
            try:
                old.evict()
            except Exception:
                logger.exception("Ending an evicted session failed (its cache is freed when it ends)")
        try:
            yield
        finally:
            with self._lock:
                self._release(hold)


def _size(nbytes: int) -> str:
    """Bytes as people read them in an error (a tiny model's session is a few KiB: '0.0 MiB' said nothing)."""
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"
