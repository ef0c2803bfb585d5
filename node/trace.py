"""Optional timeline of a node's inference rounds, for finding where a round's time goes (benchmarks only).

With ``NECTAR_TRACE=/path/file.jsonl`` in a node's environment (``{pid}`` in it becomes the node's process id), the compute thread records each round's start and
end and the event loop each step's request taken, step submitted and output sent (monotonic seconds), and the node
writes them to that file as it stops. Off (one global check per event) otherwise.
"""
from __future__ import annotations

import json
import os
import time

PATH = (os.environ.get("NECTAR_TRACE") or "").replace("{pid}", str(os.getpid())) or None  # one file per node
_events: list[tuple] = []
_LIMIT = 2_000_000


def event(kind: str, key: int = 0, value: int = 0) -> None:
    """Records ``kind`` now; ``key`` names the session (or round), ``value`` a count."""
    if PATH is not None and len(_events) < _LIMIT:
        _events.append((kind, time.perf_counter(), key, value))


def dump() -> None:
    if PATH is None or not _events:
        return
    with open(PATH, "w") as file:
        for kind, at, key, value in _events:
            file.write(json.dumps([kind, at, key, value]) + "\n")
