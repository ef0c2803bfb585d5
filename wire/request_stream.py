"""The requests of one incoming RPC stream, as its connection's reader queues them for the handler.

A handler iterates them (``async for``) or asks for the next one with a timeout (``next``). Unlike ``asyncio.Queue``
behind ``wait_for``, waiting costs no task, no shield and no extra future per request; a timeout never loses a
request, and ``readable`` tells when one has come without taking it (the node waits for a push or its client,
whichever speaks first).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any


class RequestTimeout(Exception):
    """No request came within the timeout (the stream is still open; call ``next`` again to keep waiting)."""


class RequestStream:
    """Requests queued by one reader, taken by one handler. ``None`` ends the stream; an exception put in the queue
    is raised to the handler where the request would have been.

    :param max_prefetch: requests read ahead of the handler before the reader waits (back-pressure on the caller)
    :param max_bytes: bytes of requests read ahead before the reader waits (one request is always taken, so a stream
        holds at most this plus the one being read); None = no byte bound
    """

    def __init__(self, max_prefetch: int = 8, *, max_bytes: int | None = None):
        self.max_prefetch = max_prefetch
        self.max_bytes = max_bytes
        self._items: collections.deque = collections.deque()
        self._sizes: collections.deque = collections.deque()  # bytes of each queued item
        self._queued_bytes = 0
        self._readable: asyncio.Future | None = None  # resolved when an item arrives
        self._space: asyncio.Future | None = None  # resolved when the handler takes an item
        self._ended = False

    # ---- the reader's side -------------------------------------------------------------------------------------

    async def put(self, item: Any, size: int = 0) -> None:
        """Queues a request of ``size`` bytes (``None``: the caller ended the stream; an exception: raised to the
        handler)."""
        while self._items and (
            len(self._items) >= self.max_prefetch
            or (self.max_bytes is not None and self._queued_bytes + size > self.max_bytes)
        ):
            if self._space is None or self._space.done():
                self._space = asyncio.get_running_loop().create_future()
            await self._space
        self._items.append(item)
        self._sizes.append(size)
        self._queued_bytes += size
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    # ---- the handler's side ------------------------------------------------------------------------------------

    def readable(self) -> asyncio.Future:
        """A future that is done once a request (or the end of the stream) is queued; it takes nothing."""
        if self._items or self._ended:
            future = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future
        if self._readable is None or self._readable.done():
            self._readable = asyncio.get_running_loop().create_future()
        return self._readable

    async def next(self, timeout: float | None = None):
        """The next request, or None once the caller ended the stream; ``RequestTimeout`` after ``timeout`` s."""
        if not self._items and not self._ended:
            readable = self.readable()
            if timeout is None:
                await readable
            else:
                loop = asyncio.get_running_loop()
                timer = loop.call_later(timeout, _expire, readable)
                try:
                    await readable
                except RequestTimeout:
                    if not self._items:
                        raise
                finally:
                    timer.cancel()
        return self._take()

    def _take(self):
        if not self._items:
            return None  # ended
        item = self._items.popleft()
        self._queued_bytes -= self._sizes.popleft()
        if self._space is not None and not self._space.done():
            self._space.set_result(None)
        if item is None:
            self._ended = True
            return None
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.next()
        if item is None:
            raise StopAsyncIteration
        return item


def _expire(readable: asyncio.Future) -> None:
    if not readable.done():
        readable.set_exception(RequestTimeout())
