"""Request limits: a fixed window per counter name, in this process or shared through Redis.

Counters are per API key (requests per minute), and per client address (failed authentications, sign-ups).
``MemoryRateLimiter`` suits one API process; with several behind a load balancer set ``NECTAR_API_RATE_LIMIT_URL``
to a Redis URL so they count together (INCR + EXPIRE on one key per counter and window).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod

logger = logging.getLogger(__name__)

WINDOW_SECONDS = 60
MAX_COUNTERS = 100_000  # in memory: past it, counters of ended windows are dropped


class RateLimiter(ABC):
    @abstractmethod
    def hit(self, name: int | str, limit: int, window: int = WINDOW_SECONDS) -> float | None:
        """Counts one event; None if within ``limit`` per ``window`` seconds, else seconds until the window ends."""

    @abstractmethod
    def blocked(self, name: int | str, limit: int, window: int = WINDOW_SECONDS) -> float | None:
        """Like ``hit`` without counting: whether ``limit`` events were already counted in this window."""

    @abstractmethod
    def first_use(self, name: str, ttl: int) -> bool:
        """True the first time ``name`` is seen within ``ttl`` seconds (a signed request's nonce), else False."""


def _window(window: int) -> tuple[float, int]:
    now = time.time()
    return now, int(now // window)


class MemoryRateLimiter(RateLimiter):
    def __init__(self):
        self._counts: dict[tuple[str, int, int], int] = {}
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def first_use(self, name, ttl):
        now = time.time()
        with self._lock:
            if len(self._seen) > MAX_COUNTERS:
                self._seen = {k: v for k, v in self._seen.items() if v > now}
            if self._seen.get(name, 0) > now:
                return False
            self._seen[name] = now + ttl
            return True

    def _count(self, name, limit: int, window: int, add: int) -> float | None:
        now, index = _window(window)
        key = (str(name), window, index)
        with self._lock:
            if add and len(self._counts) > MAX_COUNTERS:  # drop ended windows
                self._counts = {k: v for k, v in self._counts.items() if k[2] == int(now // k[1])}
            count = self._counts.get(key, 0) + add
            if add:
                self._counts[key] = count
        allowed = count <= limit if add else count < limit
        return None if allowed else (index + 1) * window - now

    def hit(self, name, limit, window=WINDOW_SECONDS):
        return self._count(name, limit, window, 1)

    def blocked(self, name, limit, window=WINDOW_SECONDS):
        return self._count(name, limit, window, 0)


class RedisRateLimiter(RateLimiter):
    def __init__(self, url: str, *, prefix: str = "nectar-api:rl"):
        import redis

        self.client, self.prefix = redis.Redis.from_url(url, socket_timeout=2), prefix

    def hit(self, name, limit, window=WINDOW_SECONDS):
        now, index = _window(window)
        key = f"{self.prefix}:{name}:{window}:{index}"
        pipe = self.client.pipeline()
        pipe.incr(key)
        pipe.expire(key, window * 2)
        count = pipe.execute()[0]
        return None if count <= limit else (index + 1) * window - now

    def first_use(self, name, ttl):
        return bool(self.client.set(f"{self.prefix}:once:{name}", 1, nx=True, ex=ttl))

    def blocked(self, name, limit, window=WINDOW_SECONDS):
        now, index = _window(window)
        count = int(self.client.get(f"{self.prefix}:{name}:{window}:{index}") or 0)
        return None if count < limit else (index + 1) * window - now


def make_rate_limiter(url: str | None) -> RateLimiter:
    return RedisRateLimiter(url) if url else MemoryRateLimiter()
