"""Per-key request limits: a fixed one-minute window, in this process or shared through Redis.

``MemoryRateLimiter`` suits one API process; with several behind a load balancer set ``NECTAR_API_RATE_LIMIT_URL``
to a Redis URL so they count together (INCR + EXPIRE on one key per API key and minute).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60


class RateLimiter(ABC):
    @abstractmethod
    def hit(self, key_id: int, limit: int) -> float | None:
        """Counts one request; None if allowed, else seconds until the window resets (answer 429)."""


class MemoryRateLimiter(RateLimiter):
    def __init__(self):
        self._counts: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def hit(self, key_id: int, limit: int) -> float | None:
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        with self._lock:
            if len(self._counts) > 100_000:  # drop old windows
                self._counts = {k: v for k, v in self._counts.items() if k[1] == window}
            count = self._counts.get((key_id, window), 0) + 1
            self._counts[(key_id, window)] = count
        return None if count <= limit else (window + 1) * WINDOW_SECONDS - now


class RedisRateLimiter(RateLimiter):
    def __init__(self, url: str, *, prefix: str = "nectar-api:rl"):
        import redis

        self.client, self.prefix = redis.Redis.from_url(url, socket_timeout=2), prefix

    def hit(self, key_id: int, limit: int) -> float | None:
        now = time.time()
        window = int(now // WINDOW_SECONDS)
        name = f"{self.prefix}:{key_id}:{window}"
        pipe = self.client.pipeline()
        pipe.incr(name)
        pipe.expire(name, WINDOW_SECONDS * 2)
        count = pipe.execute()[0]
        return None if count <= limit else (window + 1) * WINDOW_SECONDS - now


def make_rate_limiter(url: str | None) -> RateLimiter:
    return RedisRateLimiter(url) if url else MemoryRateLimiter()
