"""Optional timeline of a node's inference rounds, for finding where a round's time goes (benchmarks only).

With ``NECTAR_TRACE=/path/file.jsonl`` in a node's environment (``{pid}`` in it becomes the node's process id), the
compute thread records each round's start and end and the event loop each step's request taken, step submitted and
output sent (monotonic seconds), and the node writes them to that file as it stops. Off (one global check per event)
otherwise.
"""

from __future__ import annotations

import json
import time

from nectar.settings import current

PATH: str | None = None  # set by start(): one global check per event while tracing is off
_events: list[tuple] = []
_LIMIT = 2_000_000


def start() -> None:
    """Turns tracing on where the settings name a file (``{pid}`` in it becomes this process's id)."""
    global PATH
    path = current().trace_path
    PATH = str(path) if path is not None else None


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
