"""Inputs and outputs of recent sessions, kept so the ledger can spot-check any step after the fact.

A step's output depends on every input of its session so far, so the log keeps each session's inputs in order;
``history(session, step)`` returns them concatenated up to that step, with the step's own output exactly as it was
sent (the receipt's output commitment is its hash: an audit compares every coordinate of it with a recomputation).
Bounded by bytes and age.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import torch

logger = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, *, max_bytes: int, retention_s: float):
        self.max_bytes, self.retention_s = max_bytes, retention_s
        self._sessions: OrderedDict[bytes, dict] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._warned_at = float("-inf")

    def record(
        self,
        session_id: bytes,
        step: int,
        position: int,
        inputs: torch.Tensor,
        start: int,
        end: int,
        *,
        prompts: torch.Tensor | None = None,
        outputs: torch.Tensor | None = None,
    ) -> None:
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                entry = self._sessions[session_id] = {
                    "steps": {},
                    "span": (start, end),
                    "touched": time.time(),
                    "prompts": None,
                }
            if prompts is not None:
                entry["prompts"] = prompts.detach().cpu().clone()
            previous = entry["steps"].get(step)
            if previous is not None:
                self._bytes -= _size(previous)
            kept = (
                position,
                inputs.detach().cpu().clone(),
                None if outputs is None else outputs.detach().cpu().clone(),
            )
            entry["steps"][step] = kept
            entry["touched"] = time.time()
            self._sessions.move_to_end(session_id)
            self._bytes += _size(kept)
            self._evict()

    def _evict(self) -> None:
        deadline = time.time() - self.retention_s
        while self._sessions and (
            self._bytes > self.max_bytes or next(iter(self._sessions.values()))["touched"] < deadline
        ):
            _, entry = self._sessions.popitem(last=False)
            if entry["touched"] >= deadline and time.monotonic() - self._warned_at > 60:
                self._warned_at = time.monotonic()  # audits of a record dropped early fail (issue 21)
                logger.warning(
                    f"Audit memory full ({self.max_bytes} bytes): dropped a session's inputs and outputs "
                    f"{time.time() - entry['touched']:.0f}s old, before the {self.retention_s:g}s retention; its "
                    "audits will fail. Raise --audit-memory-bytes"
                )
            self._bytes -= sum(_size(kept) for kept in entry["steps"].values())

    def history(self, session_id: bytes, step: int):
        """(the session's input sequence [B, L, H] as it stood after ``step`` (rollbacks applied), its span, the
        deep prompts sent with its first step or None, the step's output as sent or None), or None if unknown."""
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None or step not in entry["steps"]:
                return None
            sequence = None
            for s in sorted(entry["steps"]):
                if s > step:
                    break
                position, tensor, _ = entry["steps"][s]
                sequence = tensor if sequence is None else torch.cat([sequence[:, :position], tensor], dim=1)
            return sequence, entry["span"], entry["prompts"], entry["steps"][step][2]


def _size(kept: tuple) -> int:
    return sum(t.numel() * t.element_size() for t in kept[1:] if t is not None)
