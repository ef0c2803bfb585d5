"""Keeps the autograd graphs of recent forwards, so a backward with the same inputs skips the recomputation.

Training clients call forward, then backward with the very same hidden states (and prompts). Petals recomputes the
forward inside backward, which makes a training step cost 3 forwards' worth of compute on the node instead of 2.
The cache is bounded by the bytes the graphs hold (activations saved for backward), by age, and matches inputs
exactly (``torch.equal``), so a miss only costs the recomputation it saves.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    key: tuple
    hidden: torch.Tensor
    prompts: torch.Tensor | None
    inputs: list
    output: torch.Tensor
    nbytes: int
    created: float


class TrainingGraphCache:
    """Recent forward graphs of one backend. Used from the compute thread; a lock guards the bookkeeping anyway.

    :param max_bytes: activations kept across all graphs (oldest evicted first); 0 disables the cache
    :param max_age: seconds a graph waits for its backward before it is dropped
    """

    def __init__(self, *, max_bytes: int, max_age: float = 120.0):
        self.max_bytes, self.max_age = max_bytes, max_age
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._ids = itertools.count()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(
        self,
        *,
        key: tuple,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        inputs: list,
        output: torch.Tensor,
        nbytes: int,
    ) -> None:
        if self.max_bytes <= 0 or nbytes > self.max_bytes or output.grad_fn is None:
            return
        with self._lock:
            self._expire()
            while self._entries and self._bytes + nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[next(self._ids)] = _Entry(key, hidden, prompts, inputs, output, nbytes, time.monotonic())
            self._bytes += nbytes

    def pop(self, *, key: tuple, hidden: torch.Tensor, prompts: torch.Tensor | None):
        """(inputs, output) of a kept forward with exactly these inputs, removed from the cache; None if absent."""
        with self._lock:
            self._expire()
            for entry_id, entry in reversed(self._entries.items()):
                if entry.key == key and _same(entry.hidden, hidden) and _same(entry.prompts, prompts):
                    self._drop(entry_id)
                    self.hits += 1
                    return entry.inputs, entry.output
            self.misses += 1
            return None

    def _expire(self) -> None:
        deadline = time.monotonic() - self.max_age
        while self._entries:
            entry_id, entry = next(iter(self._entries.items()))
            if entry.created >= deadline:
                break
            self._drop(entry_id)

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self._bytes -= entry.nbytes


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
