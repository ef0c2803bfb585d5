"""The KV-cache budget of a node: sessions reserve bytes up front and get a clear error when the budget is spent."""

from __future__ import annotations

import contextlib
import logging
import threading

from nectar.wire.protocol import ErrorCode, NodeRPCError

logger = logging.getLogger(__name__)


class MemoryCache:
    """Tracks reserved KV-cache bytes. Reservation happens before any tensor is allocated, so a full node never OOMs.

    :param max_bytes: total budget for all sessions' caches
    :param bytes_per_token: cache bytes one token of one sequence costs across the whole hosted span
    """

    def __init__(self, max_bytes: int, bytes_per_token: int):
        self.max_bytes = max_bytes
        self.bytes_per_token = max(1, bytes_per_token)
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def tokens_left(self) -> int:
        return max(0, self.max_bytes - self._used) // self.bytes_per_token

    @contextlib.contextmanager
    def reserve(self, nbytes: int):
        with self._lock:
            if nbytes > self.max_bytes - self._used:
                raise NodeRPCError(
                    ErrorCode.CACHE_FULL,
                    f"session needs {nbytes / 2**20:.1f} MiB of KV cache but only "
                    f"{(self.max_bytes - self._used) / 2**20:.1f} MiB of {self.max_bytes / 2**20:.1f} MiB are free; "
                    "retry later, use a shorter max_length, or route through another node",
                )
            self._used += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._used -= nbytes
