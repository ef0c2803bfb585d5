"""Inputs and outputs of recent sessions, kept so the ledger can spot-check any step after the fact.

A step's output depends on every input of its session so far, so the log keeps each session's inputs in order;
``history(session, step)`` returns them concatenated up to that step, with the step's own output exactly as it was
sent (the receipt's output commitment is its hash: an audit compares every coordinate of it with a recomputation).

An audit the node cannot answer counts as a failed spot check (issue 21), so a record is never dropped before it is
``retention_s`` old (counted from its session's last step: later steps' audits need the session's first inputs):

- With a ``folder`` (a node's ``<key folder>/audit``, which it holds alone) each step's record is appended to a
  segment file of its time bucket by a writer thread (records up to 64 KiB at once while it is idle: cheaper than a
  handoff); ``record`` returns a future the step awaits before its receipt is signed, so the event loop never waits
  on a large write and no receipt leaves before its record is in the kernel (no fsync: a killed process loses
  nothing the kernel has; a power cut may lose the last seconds). Memory keeps only where each record lies (records
  still queued are served from the queue); a restarted node reads the index back, so it still answers audits of
  steps it served before. A record cut short by a crash (or failing its checksum) ends its file's valid part and is
  cut off. A segment is deleted once every session in it is past retention; a live session's records in a segment
  older than that are copied forward first.
- Without one (tests, one-off nodes) the tensors stay in memory, lost on restart.

When the bytes (memory, or disk) would run out before the oldest records age out, the node refuses NEW sessions and
forward calls (``admit``, ``cache_full``: the client tries another node) instead of evicting; sessions already open
keep going in the last eighth of the budget, and only at the full budget is their next step refused too (their
client fails over and replays elsewhere): a node never serves a step it could not prove later. The writer's queue is
bounded the same way (``max_queue_bytes``: a disk slower than serving refuses work, never grows memory). The budget
may be passed by the steps already computing when it fills.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch

from nectar.wire.protocol import NUMPY_DTYPES, ErrorCode, NodeRPCError

logger = logging.getLogger(__name__)

MAGIC = b"NAu1"
PREFIX = struct.Struct("<4sQI")  # magic, body length, crc32 of the body
META = struct.Struct("<dqqiiH")  # recorded at, step, position, span start, span end, session id length
DESC = struct.Struct("<bB")  # dtype code (-1: absent), number of dimensions; then the dimensions (int64 each)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CODES = {dtype: code for code, dtype in enumerate(DTYPES)}
STEP_INDEX_BYTES = 160  # memory a step's index entry takes (dict slot, tuple, ints), counted against max_bytes
SESSION_INDEX_BYTES = 600
NEW_WORK_SHARE = 7 / 8  # new sessions and calls stop at this share of a budget; open ones may use the rest
INLINE_BYTES = 64 << 10  # a record this small is written at once when the writer is idle: a thread handoff (and
# waking the event loop after it) costs more than the write (decode steps); larger ones (prefills) go to the writer


class _Write:
    """A record queued for the writer: its parts (without the prefix unless ``raw``), where it goes, and the future
    its step awaits; ``session_id`` and ``step`` name the index entry it replaces once written."""

    __slots__ = ("session_id", "step", "segment", "parts", "size", "raw", "future")

    def __init__(self, session_id, step, segment, parts, size, raw):
        self.session_id, self.step, self.segment, self.parts, self.size, self.raw = (
            session_id,
            step,
            segment,
            parts,
            size,
            raw,
        )
        self.future: Future | None = None  # made when queued (a small record written at once needs none)

    def record_bytes(self) -> bytes:
        """The record as it will be on disk (an audit of a step still queued)."""
        body = b"".join(bytes(p) if isinstance(p, bytes) else p.tobytes() for p in self.parts)
        return body if self.raw else PREFIX.pack(MAGIC, len(body), zlib.crc32(body)) + body


_DONE: Future = Future()
_DONE.set_result(None)


class AuditLog:
    """:param max_bytes: memory budget (the tensors too when there is no ``folder``)
    :param retention_s: a record is kept this long after its session's last step, never less
    :param folder: where records go on disk (None: memory only)
    :param max_disk_bytes: disk budget of ``folder``
    :param bucket_s: time span of one segment file (default: retention / 15, at least 1 s)
    :param max_queue_bytes: records waiting for the writer thread, at most (with a ``folder``)"""

    def __init__(
        self,
        *,
        max_bytes: int,
        retention_s: float,
        folder: str | Path | None = None,
        max_disk_bytes: int = 0,
        bucket_s: float | None = None,
        clock: Callable[[], float] = time.time,
        max_queue_bytes: int = 64 << 20,
    ):
        self.max_bytes, self.retention_s, self.clock = max_bytes, retention_s, clock
        self.folder = Path(folder) if folder is not None else None
        self.max_disk_bytes = max_disk_bytes
        self.bucket_s = bucket_s if bucket_s is not None else max(1.0, retention_s / 15)
        # session id -> {"steps": {step: where}, "span", "touched", "segments"}, least recently touched first;
        # where = (position, inputs, outputs, prompts) in memory, (segment, offset, size) on disk
        self._sessions: OrderedDict[bytes, dict] = OrderedDict()
        self._memory = 0  # bytes counted against max_bytes
        self._segments: dict[int, dict] = {}  # segment -> {"size", "last", "sessions"}: "last" = newest record time
        self._disk = 0
        self._current: int | None = None
        self._fd: int | None = None
        self._lock = threading.RLock()
        self._pruned_at = float("-inf")
        self._warned_at = float("-inf")
        self._folder_lock: int | None = None
        self.max_queue_bytes = max_queue_bytes
        self._queued = 0  # bytes of records waiting for the writer
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        if self.folder is not None:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)  # users' inputs: the node's user only
            self._folder_lock = _lock_folder(self.folder)
            self._load()
            self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
            self._writer.start()

    # ---- budget -----------------------------------------------------------------------------------------------

    def admit(self, nbytes: int = 0, *, new: bool) -> None:
        """Raises ``cache_full`` unless a step of ``nbytes`` (its inputs, output and prompts) fits the budgets
        without evicting a record before its retention; ``new``: it opens a session or is a forward call (held to
        ``NEW_WORK_SHARE`` of the budgets, so sessions already open can finish)."""
        with self._lock:
            if self.clock() - self._pruned_at > 1.0 or self._full(nbytes, new):
                self._prune()
            if self._behind(nbytes, new):
                raise NodeRPCError(
                    ErrorCode.CACHE_FULL,
                    f"audit writes are behind ({self._queued} bytes queued for this node's disk): it keeps every "
                    "step it serves for audits and cannot take more now; try another node",
                )
            if self._full(nbytes, new):
                if time.monotonic() - self._warned_at > 60:
                    self._warned_at = time.monotonic()
                    logger.warning(
                        f"Audit storage full ({self._memory} of {self.max_bytes} bytes in memory"
                        + (f", {self._disk} of {self.max_disk_bytes} on disk" if self.folder is not None else "")
                        + f", records kept {self.retention_s:g}s): refusing new work until the oldest age out. "
                        "Raise --audit-disk-bytes (or --audit-memory-bytes)"
                    )
                raise NodeRPCError(
                    ErrorCode.CACHE_FULL,
                    "audit storage full: this node keeps every step it serves for audits and has no room now; "
                    "try another node",
                )

    def _full(self, nbytes: int, new: bool) -> bool:
        share = NEW_WORK_SHARE if new else 1.0
        memory = self._memory + STEP_INDEX_BYTES + (nbytes if self.folder is None else 0)
        if memory > share * self.max_bytes:
            return True
        return self.folder is not None and self._disk + nbytes > share * self.max_disk_bytes

    def _behind(self, nbytes: int, new: bool) -> bool:
        share = NEW_WORK_SHARE if new else 1.0
        return self.folder is not None and self._queued + nbytes > share * self.max_queue_bytes

    @property
    def queued_bytes(self) -> int:
        return self._queued

    @property
    def memory_bytes(self) -> int:
        return self._memory

    @property
    def disk_bytes(self) -> int:
        return self._disk

    # ---- records ----------------------------------------------------------------------------------------------

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
    ) -> Future:
        """Keeps a step served (never refused here: ``admit`` was asked before it computed). On disk the record is
        queued for the writer thread; the future ends once it is written (or with the write's error): a step awaits
        it before its receipt is signed. The tensors must not change after this call (a node's are fresh per step)."""
        with self._lock:
            now = self.clock()
            entry = self._entry(session_id, start, end, now)
            done = _DONE
            if self.folder is None:
                kept = (position, *(_copy(t) for t in (inputs, outputs, prompts)))
                size = sum(t.nbytes for t in kept[1:] if t is not None)
            else:
                kept = self._append(session_id, step, position, start, end, now, (inputs, outputs, prompts))
                size, segment = 0, kept.segment if isinstance(kept, _Write) else kept[0]
                if isinstance(kept, _Write):
                    done = kept.future
                entry["segments"].add(segment)
                self._segments[segment]["sessions"].add(session_id)
            self._forget(entry["steps"].get(step))
            entry["steps"][step] = kept
            self._memory += STEP_INDEX_BYTES + size
            if now - self._pruned_at > 1.0:
                self._prune()
            return done

    def flush(self) -> None:
        """Waits until every queued record is written."""
        if self._writer is not None:
            marker = _Write(None, None, None, [], 0, True)
            marker.future = Future()
            self._queue.put(marker)
            marker.future.result()

    def history(self, session_id: bytes, step: int):
        """(the session's input sequence [B, L, H] as it stood after ``step`` (rollbacks applied), its span, the
        deep prompts sent with its last step at position 0 up to ``step``, or None, the step's output as sent or
        None), or None if unknown."""
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None or step not in entry["steps"]:
                return None
            sequence = prompts = outputs = None
            files: dict = {}
            try:
                for s in sorted(entry["steps"]):
                    if s > step:
                        break
                    kept = entry["steps"][s]
                    if isinstance(kept, _Write):  # still queued: from memory
                        parsed = _parse(kept.record_bytes(), 0)
                        kept = None if parsed is None else parsed[1]
                        if kept is None:
                            return None
                    elif self.folder is not None:
                        kept = self._read(kept, files=files)
                        if kept is None:
                            return None
                    position, tensor, outputs, step_prompts = kept
                    if position == 0:
                        prompts = step_prompts
                    sequence = tensor if sequence is None else torch.cat([sequence[:, :position], tensor], dim=1)
            finally:
                for f in files.values():
                    f.close()
            return sequence, entry["span"], prompts, outputs

    def close(self) -> None:
        """Writes what is queued, then lets the folder go."""
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._writer = None
        with self._lock:
            self._close_segment()
            if self._folder_lock is not None:
                os.close(self._folder_lock)  # drops the flock
                self._folder_lock = None

    def _close_segment(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._current = None

    # ---- bookkeeping ------------------------------------------------------------------------------------------

    def _entry(self, session_id: bytes, start: int, end: int, touched: float) -> dict:
        entry = self._sessions.get(session_id)
        if entry is None:
            entry = self._sessions[session_id] = {"steps": {}, "span": (start, end), "segments": set()}
            self._memory += SESSION_INDEX_BYTES
        entry["touched"] = max(touched, entry.get("touched", touched))
        self._sessions.move_to_end(session_id)
        return entry

    def _forget(self, kept) -> None:
        """A step's index entry replaced or dropped (its bytes on disk go with its segment)."""
        if kept is not None:
            self._memory -= STEP_INDEX_BYTES
            if self.folder is None:
                self._memory -= sum(t.nbytes for t in kept[1:] if t is not None)

    def _prune(self) -> None:
        """Drops sessions past retention, then segments no live session needs (copying live records forward)."""
        now = self.clock()
        self._pruned_at = now
        deadline = now - self.retention_s
        while self._sessions and next(iter(self._sessions.values()))["touched"] < deadline:
            session_id, entry = self._sessions.popitem(last=False)
            for kept in entry["steps"].values():
                self._forget(kept)
            self._memory -= SESSION_INDEX_BYTES
            for segment in entry["segments"]:
                self._segments[segment]["sessions"].discard(session_id)
        for segment in sorted(self._segments):
            info = self._segments[segment]
            if segment == int(now // self.bucket_s):  # still being written
                continue
            if info["sessions"] and info["last"] < deadline:  # only live sessions pin it: their records move on
                for session_id in list(info["sessions"]):
                    self._copy_forward(session_id, segment)
            if not info["sessions"]:
                self._drop_segment(segment)

    def _copy_forward(self, session_id: bytes, segment: int) -> None:
        entry = self._sessions[session_id]
        pinned = False
        for step, kept in sorted(entry["steps"].items()):
            if isinstance(kept, _Write):  # still queued (a writer behind by a whole retention): keeps its segment
                pinned = pinned or kept.segment == segment
            elif kept[0] == segment:
                record = self._read(kept, raw=True)
                if record is not None:
                    entry["steps"][step] = write = self._enqueue(session_id, step, record, self.clock(), raw=True)
                    entry["segments"].add(write.segment)
                    self._segments[write.segment]["sessions"].add(session_id)
        if not pinned:
            entry["segments"].discard(segment)
            self._segments[segment]["sessions"].discard(session_id)

    def _drop_segment(self, segment: int) -> None:
        info = self._segments.pop(segment)  # the writer's open file of it, if any, closes at its next segment
        self._disk -= info["size"]
        self._path(segment).unlink(missing_ok=True)

    # ---- disk -------------------------------------------------------------------------------------------------

    def _path(self, segment: int) -> Path:
        return self.folder / f"{segment}.audit"

    def _append(self, session_id, step, position, start, end, now, tensors) -> _Write | tuple[int, int, int]:
        """Queues a step's record (its header and views of its tensors, checksummed and written by the writer), or
        writes a small one at once while the writer is idle: (segment, offset, size)."""
        parts = [META.pack(now, step, position, start, end, len(session_id)), bytes(session_id)]
        payloads = []
        for tensor in tensors:
            if tensor is None:
                parts.append(_ABSENT)
                continue
            parts.append(DESC.pack(CODES[tensor.dtype], tensor.ndim) + struct.pack(f"<{tensor.ndim}q", *tensor.shape))
            payloads.append(_payload(tensor))
        write = self._enqueue(session_id, step, parts + payloads, now, raw=False, queue=False)
        if write.size <= INLINE_BYTES and self._queued == write.size:  # only this one: the writer is idle
            try:
                where = self._write(write)
            except Exception as e:
                self._failed(write, e)
                raise
            self._queued -= write.size
            return where
        write.future = Future()
        self._queue.put(write)
        return write

    def _enqueue(self, session_id, step, parts: list, now: float, *, raw: bool, queue: bool = True) -> _Write:
        """Counts a record against the budgets and its segment (so ``admit`` and ``_prune`` see it at once) and hands
        it to the writer."""
        size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts) + (0 if raw else PREFIX.size)
        segment = int(now // self.bucket_s)
        info = self._segments.setdefault(segment, {"size": 0, "written": 0, "last": now, "sessions": set()})
        info["size"] += size
        info["last"] = max(info["last"], now)
        self._disk += size
        self._queued += size
        write = _Write(session_id, step, segment, parts, size, raw)
        if queue:
            write.future = Future()
            self._queue.put(write)
        return write

    def _write_loop(self) -> None:
        """The writer thread: appends queued records in order, each in one system call, and puts where it lies in
        the index (a step's future ends then). Only this thread opens, writes and closes segment files."""
        while (write := self._queue.get()) is not None:
            if write.segment is None:  # flush()'s marker
                write.future.set_result(None)
                continue
            try:
                where = self._write(write)
            except Exception as e:  # the disk (full, gone): the step fails, so no receipt is signed for it
                with self._lock:
                    self._failed(write, e)
                write.future.set_exception(e)
                continue
            with self._lock:
                self._queued -= write.size
                self._unindex(write, where)
            write.future.set_result(None)

    def _failed(self, write: _Write, error: Exception) -> None:
        logger.error(f"Audit log: could not write a record: {error}")
        self._queued -= write.size
        info = self._segments.get(write.segment)
        if info is not None:  # (a dropped segment took its bytes off the disk count already)
            info["size"] -= write.size
            self._disk -= write.size
        self._unindex(write, None)

    def _unindex(self, write: _Write, where) -> None:
        """The index entry of a written (or failed: None) record: where it lies instead of the queued record."""
        entry = self._sessions.get(write.session_id)
        if entry is not None and entry["steps"].get(write.step) is write:
            if where is None:
                del entry["steps"][write.step]
                self._forget(write)
            else:
                entry["steps"][write.step] = where

    def _write(self, write: _Write) -> tuple[int, int, int]:
        """Appends one record (its parts in one system call) to its segment: (segment, offset, size)."""
        parts = write.parts
        if not write.raw:
            crc, length = 0, 0
            for part in parts:
                crc = zlib.crc32(part, crc)
                length += len(part) if isinstance(part, bytes) else part.nbytes
            parts = [PREFIX.pack(MAGIC, length, crc), *parts]
        with self._lock:
            info = self._segments.get(write.segment)
            if info is None:
                raise OSError(f"audit log: segment {write.segment} was dropped before its record was written")
            if write.segment != self._current:
                self._close_segment()
                path = self._path(write.segment)
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._current = write.segment
            fd, offset = self._fd, info["written"]
        size = os.writev(fd, parts)  # outside the lock: admit, record and history go on meanwhile
        if size != write.size:  # a short write (disk full): cut it off, or records after it would be lost on reload
            os.ftruncate(fd, offset)
            raise OSError(f"audit log: wrote {size} of {write.size} bytes to {self._path(write.segment)} (disk full?)")
        with self._lock:
            info["written"] += size
        return write.segment, offset, size

    def _read(self, where, *, raw: bool = False, files: dict | None = None):
        """The record at ``where``: (position, inputs, outputs, prompts), its bytes as written (``raw``), or None
        if it is gone or damaged. ``files``: segment -> open file, for the caller to close (else opened here)."""
        segment, offset, size = where
        try:
            if files is None:
                with open(self._path(segment), "rb") as f:
                    data = os.pread(f.fileno(), size, offset)
            else:
                if segment not in files:
                    files[segment] = open(self._path(segment), "rb")
                data = os.pread(files[segment].fileno(), size, offset)
        except OSError:
            data = b""
        parsed = _parse(data, 0) if len(data) == size else None
        if parsed is None:
            logger.error(f"Audit record at {self._path(segment)}:{offset} is missing or damaged")
            return None
        return [data] if raw else parsed[1]

    def _load(self) -> None:
        """Reads the index of every segment back (a node restarting), cuts damaged tails, drops what is past
        retention."""
        found = 0
        for path in sorted(self.folder.glob("*.audit"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
            if not path.stem.isdigit():
                continue
            segment, valid = int(path.stem), 0
            info = self._segments[segment] = {"size": 0, "written": 0, "last": float("-inf"), "sessions": set()}
            with open(path, "r+b") as f:
                size = os.fstat(f.fileno()).st_size
                data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
                try:
                    while (parsed := _parse(data, valid, header_only=True)) is not None:
                        length, (session_id, step, position, start, end, at) = parsed
                        entry = self._entry(session_id, start, end, at)
                        self._forget(entry["steps"].get(step))
                        entry["steps"][step] = (segment, valid, length)
                        entry["segments"].add(segment)
                        info["sessions"].add(session_id)
                        info["last"] = max(info["last"], at)
                        self._memory += STEP_INDEX_BYTES
                        valid += length
                        found += 1
                finally:
                    if size:
                        data.close()
                if valid < size:
                    logger.warning(f"Audit log {path}: {size - valid} bytes cut short or damaged at its end, cut off")
                    f.truncate(valid)
            info["size"] = info["written"] = valid
            self._disk += valid
        # sessions were entered in file order; retention counts from each one's last step
        for session_id in sorted(self._sessions, key=lambda s: self._sessions[s]["touched"]):
            self._sessions.move_to_end(session_id)
        self._prune()
        if found:
            logger.info(
                f"Audit log: {found} steps of {len(self._sessions)} sessions kept from before this start "
                f"({self._disk} bytes in {self.folder})"
            )


def _lock_folder(folder: Path) -> int:
    """Holds ``folder`` for this process (two nodes appending to one folder would garble each other's records)."""
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(
            f"the audit folder {folder} is in use by another live node: give each node its own --audit-dir"
        ) from None
    return fd


_ABSENT = DESC.pack(-1, 0)


def _payload(tensor: torch.Tensor):
    """A tensor's bytes as a buffer ``writev`` and ``crc32`` take: a CPU step's own tensor as it lies (a decode step's
    record is written on the event loop, where each torch call costs microseconds), anything else copied."""
    if tensor.dtype in NUMPY_DTYPES and tensor.is_cpu and not tensor.requires_grad and tensor.is_contiguous():
        return tensor.numpy()
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach().cpu().clone()


def _parse(data, offset: int, *, header_only: bool = False):
    """(record length, its meta (session id, step, position, start, end, time) if ``header_only``, else
    (position, inputs, outputs, prompts)) of the record at ``offset``, or None if it is cut short or damaged."""
    end = offset + PREFIX.size
    if len(data) < end:
        return None
    magic, length, crc = PREFIX.unpack_from(data, offset)
    if magic != MAGIC or len(data) < end + length:
        return None
    body = memoryview(data)[end : end + length]
    try:
        if zlib.crc32(body) != crc:
            return None
        at, step, position, start, stop, sid_length = META.unpack_from(body, 0)
        cursor = META.size + sid_length
        session_id = bytes(body[META.size : cursor])
        if header_only:
            return PREFIX.size + length, (session_id, step, position, start, stop, at)
        shapes = []
        for _ in range(3):
            code, ndim = DESC.unpack_from(body, cursor)
            cursor += DESC.size
            dims = struct.unpack_from(f"<{ndim}q", body, cursor)
            cursor += 8 * ndim
            shapes.append(None if code < 0 else (DTYPES[code], dims))
        tensors = []
        for shape in shapes:
            if shape is None:
                tensors.append(None)
                continue
            dtype, dims = shape
            nbytes = dtype.itemsize * int(torch.Size(dims).numel())
            chunk = bytearray(body[cursor : cursor + nbytes])
            cursor += nbytes
            tensors.append(
                torch.frombuffer(chunk, dtype=dtype).reshape(dims) if nbytes else torch.empty(dims, dtype=dtype)
            )
        return PREFIX.size + length, (position, *tensors)
    finally:
        body.release()
