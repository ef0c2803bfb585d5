"""Where a node signs its receipts: in a child process (the default), or on its event loop.

A receipt costs 0.2-0.3 ms of CPU: two tensor commitments and an ECDSA signature. On a
node that batches many sessions, that was most of each step's event-loop time, and the loop takes every session's
next step one after another while the accelerator waits for the round. ``SigningWorker`` runs
``ReceiptSigner.sign`` in a child process, which shares no GIL with the loop: the loop pickles the step's fields
and its two tensors' bytes (tens of microseconds), and the receipt comes back while the loop serves other steps. If
the child dies, the node signs on its loop from then on and says so in its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time

import torch
from hivemind.proto import runtime_pb2

from nectar.node.receipts import ReceiptSigner
from nectar.wire import receipts as schema
from nectar.wire.protocol import pack_tensor, unpack_tensor

logger = logging.getLogger(__name__)

_FRAME = struct.Struct("<I")
MAX_JOBS_AT_ONCE = 16  # the child answers at most this many receipts in one message (the first waits for the rest)
START_TIMEOUT = 45.0  # s for the child to import torch and answer (within the node's 60 s to start serving)

Signed = tuple[schema.SignedReceipt, bytes, dict]  # the receipt, its fingerprint bytes, its JSON for the wire


class SignerUnavailable(RuntimeError):
    """The signing process is gone; the receipt is signed on the event loop instead."""


class PendingReceipt:
    """A step's receipt: ``start()`` hands it to the signing process (if any), ``await result()`` gives (signed
    receipt, fingerprint, its JSON), signing it on the loop where no process took it."""

    def __init__(self, signer: ReceiptSigner, fields: dict, worker: SigningWorker | None = None):
        self._signer, self._fields, self._worker = signer, fields, worker
        self._future: asyncio.Future | None = None
        self.loop_seconds = 0.0  # event-loop time spent on it: handing it over, or signing it
        self.signed_here = False  # signed on the loop (no signing process, or it was gone)

    def start(self) -> PendingReceipt:
        if self._worker is not None and self._future is None:
            began = time.perf_counter()
            self._future = self._worker.send(self._fields)
            self.loop_seconds += time.perf_counter() - began
        return self

    async def result(self) -> Signed:
        self.start()
        if self._future is not None:
            try:
                return await self._future
            except SignerUnavailable:
                pass
        began = time.perf_counter()
        signed, fingerprint = self._signer.sign(**self._fields)
        self.loop_seconds += time.perf_counter() - began
        self.signed_here = True
        return signed, fingerprint, signed.to_json()


class InlineSigning:
    """Signs on the event loop when the receipt is awaited (``--receipt-signer loop``)."""

    def __init__(self, signer: ReceiptSigner):
        self.signer = signer

    def prepare(self, **fields) -> PendingReceipt:
        return PendingReceipt(self.signer, fields)

    async def close(self) -> None:
        pass


class SigningWorker:
    """Signs in a child process. ``spawn()`` from any thread (early: the child imports torch meanwhile), then
    ``await connect()`` and ``prepare()`` on the event loop."""

    def __init__(self, signer: ReceiptSigner):
        self.signer = signer
        self.failed: str | None = None  # why receipts are signed on the loop now
        self._process: subprocess.Popen | None = None
        self._socket: socket.socket | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next_job = 0
        self._outbox: list[bytes] = []  # jobs handed over in this turn of the loop: written together after it

    def spawn(self) -> None:
        self._socket, child = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "nectar.node.signing", str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()

    async def connect(self, timeout: float = START_TIMEOUT) -> None:
        """Hands the child its key (never on its command line) and waits until it signs."""
        reader, self._writer = await asyncio.open_connection(sock=self._socket)
        signer = self.signer
        self._write(
            pickle.dumps((signer.private_key, signer.model_id, signer.price_per_token, signer.domain, signer.compute))
        )
        try:
            address = pickle.loads(await asyncio.wait_for(_read_frame(reader), timeout))
        except (TimeoutError, asyncio.IncompleteReadError, OSError) as e:
            self._give_up(f"the signing process did not start ({type(e).__name__}); check the node's log above")
            return
        if address != signer.address:
            self._give_up(f"the signing process signs as {address}, not {signer.address}")
            return
        self._reading = asyncio.create_task(self._read_results(reader))

    def prepare(self, **fields) -> PendingReceipt:
        """A receipt for these fields, handed to the child by its ``start()`` or ``result()``: the caller picks the
        moment (the hand-over costs the loop some CPU, and waking the child can take a busy core for a moment)."""
        return PendingReceipt(self.signer, fields, self)

    def send(self, fields: dict) -> asyncio.Future | None:
        """Hands a job to the child; None where the child is gone (the caller signs itself)."""
        if self.failed is not None or self._reading is None:
            return None
        job = self._next_job
        self._next_job += 1
        step = {name: value for name, value in fields.items() if name not in ("inputs", "outputs")}
        tensors = [pack_tensor(fields[name]).SerializeToString() for name in ("inputs", "outputs")]
        loop = asyncio.get_running_loop()
        payload = pickle.dumps((job, step, *tensors))
        self._outbox.append(_FRAME.pack(len(payload)) + payload)
        if len(self._outbox) == 1:  # a round's sessions hand theirs over in one turn: one write for them all
            loop.call_soon(self._flush)
        future = loop.create_future()
        self._pending[job] = future
        return future

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        if self._writer is not None:
            self._writer.close()  # the child exits when it reads the end of its socket
        elif self._socket is not None:
            self._socket.close()
        if self._process is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._process.wait, 5)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def kill(self) -> None:
        """Stops the child from any thread, when no event loop runs any more."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        if self._socket is not None:
            self._socket.close()

    def _write(self, payload: bytes) -> None:
        self._writer.write(_FRAME.pack(len(payload)) + payload)

    def _flush(self) -> None:
        frames, self._outbox = self._outbox, []
        if self.failed is None and self._writer is not None and not self._writer.is_closing():
            self._writer.write(b"".join(frames))

    async def _read_results(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                for job, result, error in pickle.loads(await _read_frame(reader)):  # what the child signed in a row
                    future = self._pending.pop(job, None)
                    if future is None or future.done():
                        continue
                    if error is not None:
                        future.set_exception(error)
                    else:
                        future.set_result(result)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._give_up(f"the signing process stopped (exit code {await self._reap()}, {type(e).__name__})")

    async def _reap(self) -> int | None:
        """The child's exit code once it is gone (it closed its socket, so it is exiting); no zombie is left."""
        if self._process is None:
            return None
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._process.wait, 5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            return await asyncio.get_running_loop().run_in_executor(None, self._process.wait)

    def _give_up(self, why: str) -> None:
        self.failed = why
        logger.warning(f"Receipts are signed on the node's event loop from now on: {why}")
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(SignerUnavailable(why))
                future.exception()  # retrieved: a step whose stream ended may never await it


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    return await reader.readexactly(size)


# ---------------------------------------------------------------------------------------------------- the child
def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> bytes | None:
    header = _recv_exactly(sock, _FRAME.size)
    return None if header is None else _recv_exactly(sock, _FRAME.unpack(header)[0])


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_FRAME.pack(len(payload)) + payload)


def _unpacked(message: bytes) -> torch.Tensor:
    return unpack_tensor(runtime_pb2.Tensor.FromString(message))


def _answer(job: int, fields: dict, inputs: bytes, outputs: bytes, signer: ReceiptSigner) -> tuple:
    try:
        signed, fingerprint = signer.sign(**fields, inputs=_unpacked(inputs), outputs=_unpacked(outputs))
        return job, (signed, fingerprint, signed.to_json()), None
    except Exception as e:
        try:
            pickle.dumps(e)
            return job, None, e
        except Exception:
            return job, None, RuntimeError(f"{type(e).__name__}: {e}")


def _jobs(sock: socket.socket, waiting: select.poll, first: bytes) -> list[bytes]:
    """``first`` and the jobs already waiting behind it (at most ``MAX_JOBS_AT_ONCE``): signed, then answered in one
    frame, so the node's loop reads one message for a round's receipts instead of one each."""
    jobs = [first]
    while len(jobs) < MAX_JOBS_AT_ONCE and waiting.poll(0):
        frame = _recv_frame(sock)
        if frame is None:
            break
        jobs.append(frame)
    return jobs


def serve(fd: int) -> None:
    """The child's loop: a key, then one job per frame, until the node closes its end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node; the child ends with its socket
    with contextlib.suppress(AttributeError, OSError):  # Linux: a job's arrival must not preempt the node's threads
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    torch.set_num_threads(1)
    sock = socket.socket(fileno=fd)
    first = _recv_frame(sock)
    if first is None:
        return
    private_key, model_id, price_per_token, domain, compute = pickle.loads(first)
    signer = ReceiptSigner(
        private_key=private_key, model_id=model_id, price_per_token=price_per_token, domain=domain, compute=compute
    )
    _send_frame(sock, pickle.dumps(signer.address))
    waiting = select.poll()  # (not select.select: the inherited descriptor's number may pass FD_SETSIZE)
    waiting.register(sock, select.POLLIN)
    while (frame := _recv_frame(sock)) is not None:
        _send_frame(sock, pickle.dumps([_answer(*pickle.loads(job), signer) for job in _jobs(sock, waiting, frame)]))


if __name__ == "__main__":
    serve(int(sys.argv[1]))
