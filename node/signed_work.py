"""The node's promise never to sign two receipts for one work key (session, span, kind, step), kept across restarts.

Two receipts with one work key, one input and two outputs are a double-sign on chain (``Slashing.slashDoubleSign``):
half the node's stake. Session ids are bound to a node-drawn nonce (``nectar.wire.receipts.bind_session``), so honest
work never reuses a key; this guard makes sure that no request, replay or restart makes the node sign one twice.

``SignedWork`` keeps every key signed in the last ``window_s`` seconds (the chain refuses evidence older than its
``maxEvidenceAge``, 12 h by default; the window adds a margin for clock skew) in one dict, so a check is one lookup,
and appends each signed key to a journal in the node's key folder: one file per ``bucket_s`` of wall-clock time,
32 bytes a receipt (the key, and the first 16 bytes of the receipt's input commitment). Files older than the
window are deleted, and their keys forgotten, as time moves on; a restarted node reads the rest back. A write goes
to the operating system before the receipt leaves the node, so it survives the node's crash or kill (a power cut
may lose the last seconds, but no session from before a restart can be opened again: its nonce is never redrawn).

A key comes in three states: free, taken (a step for it is being computed or signed) and signed; a taken key that is
never signed is forgotten with its bucket. The last
``replays`` receipts are kept, so a step re-sent with the same input gets its receipt again, never a new one.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

RECORD = 32  # bytes per journal record: work key (16) + input commitment prefix (16)
_BUCKET = struct.Struct(">I")  # in memory a key's value ends with the bucket that forgets it
EVIDENCE_MARGIN_S = 3600.0  # kept this long past the chain's maxEvidenceAge: clocks differ
DEFAULT_WINDOW_S = 12 * 3600.0 + EVIDENCE_MARGIN_S  # the contracts' default maxEvidenceAge (12 h), and the margin
DEFAULT_BUCKET_S = 3600.0
DEFAULT_MAX_KEYS = 20_000_000  # ~640 MB of journal, a few GB of memory: ~430 receipts/s for the whole window


class JournalFull(RuntimeError):
    """The window holds ``max_keys`` signed keys: the node signs nothing more until the oldest age out."""


class SignedWork:
    """The keys this node signed within the window. ``folder=None`` keeps them in memory only (tests, one-off
    nodes); a node passes ``<key folder>/signed-work``, which it holds exclusively (``nectar.node.identity``)."""

    def __init__(
        self,
        folder: str | Path | None,
        *,
        window_s: float = DEFAULT_WINDOW_S,
        bucket_s: float = DEFAULT_BUCKET_S,
        max_keys: int = DEFAULT_MAX_KEYS,
        replays: int = 4096,
        clock: Callable[[], float] = time.time,
    ):
        if not 0 < bucket_s <= window_s:
            raise ValueError(f"bucket_s must be in (0, window_s], got {bucket_s} for a window of {window_s}")
        self.folder = Path(folder) if folder is not None else None
        self.bucket_s, self.max_keys, self.clock = bucket_s, max_keys, clock
        self.buckets_kept = int(-(-window_s // bucket_s)) + 1  # whole buckets covering the window, and the current
        # key -> input commitment prefix (signed) or nothing (taken), then the key's latest bucket (4 bytes)
        self._keys: dict[bytes, bytes] = {}
        self._buckets: deque[tuple[int, list[bytes]]] = deque()  # (bucket, keys taken or signed in it), oldest first
        self._fd: int | None = None
        self._replays: OrderedDict[bytes, tuple] = OrderedDict()
        self._replay_limit = replays
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._load()

    def __len__(self) -> int:
        return len(self._keys)

    # ---- the guard ----------------------------------------------------------------------------------------------

    def take(self, key: bytes) -> bytes | None:
        """Reserves a free key (None), or returns what it holds: ``b""`` while taken, else the first 16 bytes of
        the input commitment of the receipt signed for it. O(1): one dict lookup on the step's path."""
        held = self._keys.get(key)
        if held is not None:
            return held[:-4]
        if len(self._keys) >= self.max_keys:
            self._prune()
            if len(self._keys) >= self.max_keys:
                raise JournalFull(
                    f"this node signed {self.max_keys} receipts within the last {self.buckets_kept - 1} hours, its "
                    "limit; it takes new work once the oldest age out"
                )
        self._keys[key] = self._current()
        self._buckets[-1][1].append(key)
        return None

    def release(self, key: bytes) -> None:
        """Frees a key taken by a step that failed before anything was signed for it."""
        held = self._keys.get(key)
        if held is not None and len(held) == 4:
            del self._keys[key]

    def signed(self, key: bytes, input_commitment: bytes, replay: tuple | None = None) -> None:
        """Records a receipt signed for ``key`` (journal first: the receipt leaves the node only after this);
        ``replay`` is what a same-input re-send gets back."""
        bucket = self._current()
        prefix = bytes(input_commitment[:16])
        if self._fd is not None:
            os.write(self._fd, key + prefix)
        held = self._keys.get(key)
        if held is None or held[-4:] != bucket:
            self._buckets[-1][1].append(key)
        self._keys[key] = prefix + bucket
        if replay is not None:
            self._replays[key] = replay
            if len(self._replays) > self._replay_limit:
                self._replays.popitem(last=False)

    def replay(self, key: bytes) -> tuple | None:
        """The signed receipt kept for ``key`` (what ``signed`` was given), if still kept."""
        return self._replays.get(key)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ---- the journal --------------------------------------------------------------------------------------------

    def _path(self, bucket: int) -> Path:
        return self.folder / f"{bucket}.keys"

    def _current(self) -> bytes:
        """The current bucket (4 bytes), its journal file open."""
        bucket = int(self.clock() // self.bucket_s)
        if not self._buckets or self._buckets[-1][0] != bucket:
            self._roll(bucket)
        return _BUCKET.pack(bucket)

    def _load(self) -> None:
        oldest = int(self.clock() // self.bucket_s) - self.buckets_kept + 1
        loaded = 0
        for path in sorted(self.folder.glob("*.keys"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
            bucket = int(path.stem) if path.stem.isdigit() else None
            if bucket is None or bucket < oldest:
                path.unlink(missing_ok=True)  # older than any evidence the chain accepts (or not ours)
                continue
            data = path.read_bytes()
            data = data[: len(data) - len(data) % RECORD]  # a record cut short by a crash was never acknowledged
            tag, keys = _BUCKET.pack(bucket), []
            for i in range(0, len(data), RECORD):
                key = data[i : i + 16]
                self._keys[key] = data[i + 16 : i + RECORD] + tag
                keys.append(key)
            self._buckets.append((bucket, keys))
            loaded += len(keys)
        if loaded:
            logger.info(f"Signed-work journal: {loaded} receipts signed within the evidence window, never re-signed")

    def _roll(self, bucket: int) -> None:
        """A new time bucket: its journal file opens, buckets older than the window are forgotten."""
        self._buckets.append((bucket, []))
        if self.folder is not None:
            self.close()
            self._fd = os.open(self._path(bucket), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._prune()

    def _prune(self) -> None:
        oldest = int(self.clock() // self.bucket_s) - self.buckets_kept + 1
        while self._buckets and self._buckets[0][0] < oldest:
            bucket, keys = self._buckets.popleft()
            tag = _BUCKET.pack(bucket)
            for key in keys:
                held = self._keys.get(key)
                if held is not None and held[-4:] == tag:  # a key seen again later is forgotten with that bucket
                    del self._keys[key]
                    self._replays.pop(key, None)
            if self.folder is not None:
                self._path(bucket).unlink(missing_ok=True)
