"""The node's promise never to sign two receipts for one work key (session, span, kind, step), kept across restarts.

Two receipts with one work key, one input and two outputs are a double-sign on chain (``Slashing.slashDoubleSign``):
half the node's stake. Session ids are bound to a node-drawn nonce (``nectar.wire.receipts.bind_session``), so honest
work never reuses a key; this guard makes sure that no request, retry or restart makes the node sign one twice.

``SignedWork`` keeps every key signed in the last ``window_s`` seconds (the chain refuses evidence older than its
``maxEvidenceAge``, 12 h by default; the window adds a margin for clock skew) in one dict, so a check is one lookup,
and appends each signed key to a journal in the node's key folder: one file per ``bucket_s`` of wall-clock time,
8 bytes a receipt (the first 8 bytes of its work key: a false match among millions of keys is a 1 in 10^12 event,
and costs a refused step, never a second signature). Files older than the window are deleted, and their keys
forgotten, as time moves on; a restarted node reads the rest back. A write goes to the operating system before the
receipt leaves the node, so it survives the node's crash or kill (a power cut may lose the last seconds, but no
session from before a restart can be opened again: its nonce is never drawn again).

A key is free, taken (a step for it is being computed or signed; forgotten with its bucket if never signed) or
signed. The last ``replays`` receipts are kept with their input, so a step retried with the same input gets its
receipt again; any other re-send of a signed key is refused.
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

RECORD = struct.Struct("<Q")  # a journal record: the work key's first 8 bytes
EVIDENCE_MARGIN_S = 3600.0  # kept this long past the chain's maxEvidenceAge: clocks differ
DEFAULT_WINDOW_S = 12 * 3600.0 + EVIDENCE_MARGIN_S  # the contracts' default maxEvidenceAge (12 h), and the margin
DEFAULT_BUCKET_S = 3600.0
DEFAULT_MAX_KEYS = 50_000_000  # ~400 MB of journal and ~4 GB of memory: ~1,000 receipts/s for the whole window


class State:
    FREE = None
    TAKEN = "taken"
    SIGNED = "signed"


class JournalFull(RuntimeError):
    """The window holds ``max_keys`` keys: the node signs nothing more until the oldest age out."""


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
        # key (int) -> its tag: the bucket that forgets it, times 2, plus 1 once signed. Tags are shared objects
        # (``_tag``), so an entry costs the dict slot and the key's int (~80 bytes with its place in a bucket list)
        self._keys: dict[int, int] = {}
        self._buckets: deque[tuple[int, list[int]]] = deque()  # (bucket, keys taken or signed in it), oldest first
        self._tags: dict[int, int] = {}
        self._fd: int | None = None
        self._replays: OrderedDict[int, tuple] = OrderedDict()  # key -> (input commitment, what a retry gets)
        self._replay_limit = replays
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._load()

    def __len__(self) -> int:
        return len(self._keys)

    # ---- the guard ----------------------------------------------------------------------------------------------

    def take(self, key: bytes) -> str | None:
        """Reserves a free key (returns ``State.FREE``, None), or says what it is: ``State.TAKEN`` or
        ``State.SIGNED``. O(1): one dict lookup on the step's path."""
        k = int.from_bytes(key[:8], "little")
        held = self._keys.get(k)
        if held is not None:
            return State.SIGNED if held & 1 else State.TAKEN
        if len(self._keys) >= self.max_keys:
            self._prune()
            if len(self._keys) >= self.max_keys:
                raise JournalFull(
                    f"this node signed {self.max_keys} receipts within the evidence window, its limit; it takes new "
                    "work once the oldest age out"
                )
        bucket = self._current()
        self._keys[k] = self._tag(2 * bucket)
        self._buckets[-1][1].append(k)
        return State.FREE

    def release(self, key: bytes) -> None:
        """Frees a key taken by a step that failed before anything was signed for it."""
        k = int.from_bytes(key[:8], "little")
        held = self._keys.get(k)
        if held is not None and not held & 1:
            del self._keys[k]

    def signed(self, key: bytes, input_commitment: bytes, replay: tuple | None = None) -> None:
        """Records a receipt signed for ``key`` (journal first: the receipt leaves the node only after this);
        ``replay`` is what a retry with the same input gets back."""
        k = int.from_bytes(key[:8], "little")
        bucket = self._current()
        if self._fd is not None:
            os.write(self._fd, RECORD.pack(k))
        held = self._keys.get(k)
        if held is None or held >> 1 != bucket:
            self._buckets[-1][1].append(k)  # forgotten with this bucket, not the one it was taken in
        self._keys[k] = self._tag(2 * bucket + 1)
        if replay is not None:
            self._replays[k] = (bytes(input_commitment), replay)
            if len(self._replays) > self._replay_limit:
                self._replays.popitem(last=False)

    def replay(self, key: bytes) -> tuple[bytes, tuple] | None:
        """(the signed receipt's input commitment, what ``signed`` was given as ``replay``) while kept."""
        return self._replays.get(int.from_bytes(key[:8], "little"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ---- the journal --------------------------------------------------------------------------------------------

    def _tag(self, value: int) -> int:
        return self._tags.setdefault(value, value)

    def _path(self, bucket: int) -> Path:
        return self.folder / f"{bucket}.keys"

    def _current(self) -> int:
        """The current bucket, its journal file open."""
        bucket = int(self.clock() // self.bucket_s)
        if not self._buckets or self._buckets[-1][0] != bucket:
            self._roll(bucket)
        return bucket

    def _load(self) -> None:
        oldest = int(self.clock() // self.bucket_s) - self.buckets_kept + 1
        loaded = 0
        for path in sorted(self.folder.glob("*.keys"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
            bucket = int(path.stem) if path.stem.isdigit() else None
            if bucket is None or bucket < oldest:
                path.unlink(missing_ok=True)  # older than any evidence the chain accepts (or not ours)
                continue
            data = path.read_bytes()
            data = data[: len(data) - len(data) % RECORD.size]  # a record cut short by a crash was never sent
            keys = [k for (k,) in RECORD.iter_unpack(data)]
            self._keys.update(dict.fromkeys(keys, self._tag(2 * bucket + 1)))
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
            for k in keys:
                held = self._keys.get(k)
                if held is not None and held >> 1 == bucket:  # a key seen again later goes with that bucket
                    del self._keys[k]
                    self._replays.pop(k, None)
            for tag in (2 * bucket, 2 * bucket + 1):
                self._tags.pop(tag, None)
            if self.folder is not None:
                self._path(bucket).unlink(missing_ok=True)
