"""One compute thread per node, fed by priority: inference steps first, then forward, then backward.

Running every torch call on one thread keeps CPU nodes from oversubscribing cores and gives a single place where
concurrent sessions can later be batched into one forward.
"""
from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import queue
import threading
from typing import Any, Callable

logger = logging.getLogger(__name__)


class Priority(enum.IntEnum):
    INFERENCE = 0
    FORWARD = 1
    BACKWARD = 2


class ComputeThread:
    """Runs submitted callables one at a time, lowest priority value first, FIFO within a priority."""

    def __init__(self, name: str = "nectar-compute", num_threads: int | None = None):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._counter = itertools.count()
        self._num_threads = num_threads
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import torch

        if self._num_threads:
            torch.set_num_threads(self._num_threads)
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            function, loop, future = item
            if future.cancelled():
                continue
            try:
                result = function()
            except BaseException as e:  # delivered to the awaiting coroutine
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

    def submit(self, function: Callable[[], Any], priority: Priority) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((int(priority), next(self._counter), (function, loop, future)))
        return future

    def shutdown(self) -> None:
        self._queue.put((-1, -1, None))


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
