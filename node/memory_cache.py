"""The KV-cache budget of a node: sessions reserve bytes up front and get a clear error when the budget is spent.

Each client (a verified address, issue 22) may hold at most ``client_share`` of the budget and ``client_sessions``
sessions at once, so one client cannot lock the others out; a held session is freed once idle (no paid step) for
the session timeout (``nectar.node.inference_stream``)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import defaultdict

from nectar.wire.protocol import ErrorCode, NodeRPCError

logger = logging.getLogger(__name__)


class MemoryCache:
    """Tracks reserved KV-cache bytes. Reservation happens before any tensor is allocated, so a full node never OOMs.

    :param max_bytes: total budget for all sessions' caches
    :param bytes_per_token: cache bytes one token of one sequence costs across the whole hosted span
    :param client_share: the most of ``max_bytes`` one client may hold at once
    :param client_sessions: the most sessions one client may hold at once
    """

    def __init__(self, max_bytes: int, bytes_per_token: int, *, client_share: float = 1.0, client_sessions: int = 0):
        self.max_bytes = max_bytes
        self.bytes_per_token = max(1, bytes_per_token)
        self.client_bytes = int(max_bytes * min(1.0, max(0.0, client_share)))
        self.client_sessions = client_sessions  # 0: no cap
        self._used = 0
        self._by_client: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # client -> [bytes, sessions]
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def tokens_left(self) -> int:
        return max(0, self.max_bytes - self._used) // self.bytes_per_token

    def held_by(self, client: str) -> tuple[int, int]:
        """(bytes, sessions) ``client`` holds now."""
        with self._lock:
            held = self._by_client.get(client)
            return (held[0], held[1]) if held else (0, 0)

    @contextlib.contextmanager
    def reserve(self, nbytes: int, client: str | None = None):
        with self._lock:
            held = self._by_client[client] if client is not None else None
            if held is not None and self.client_sessions and held[1] >= self.client_sessions:
                raise NodeRPCError(
                    ErrorCode.CACHE_FULL,
                    f"client {client} holds {held[1]} sessions at this node, its most at once; close one (or let "
                    "it expire) before opening another",
                )
            if held is not None and held[0] + nbytes > self.client_bytes:
                raise NodeRPCError(
                    ErrorCode.CACHE_FULL,
                    f"client {client} would hold {(held[0] + nbytes) / 2**20:.1f} MiB of this node's KV cache, "
                    f"more than the {self.client_bytes / 2**20:.1f} MiB one client may hold; close a session, use "
                    "a shorter max_length, or route through another node",
                )
            if nbytes > self.max_bytes - self._used:
                raise NodeRPCError(
                    ErrorCode.CACHE_FULL,
                    f"node busy: the session needs {nbytes / 2**20:.1f} MiB of KV cache but only "
                    f"{(self.max_bytes - self._used) / 2**20:.1f} MiB of {self.max_bytes / 2**20:.1f} MiB are free; "
                    "retry later, use a shorter max_length, or route through another node",
                )
            self._used += nbytes
            if held is not None:
                held[0] += nbytes
                held[1] += 1
        try:
            yield
        finally:
            with self._lock:
                self._used -= nbytes
                if held is not None:
                    held[0] -= nbytes
                    held[1] -= 1
                    if held[1] <= 0:
                        self._by_client.pop(client, None)
