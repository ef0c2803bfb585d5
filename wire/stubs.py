"""Typed calls to a node: each takes a message of ``nectar.wire.messages`` and returns the node's decoded reply.

Streams go to a node's direct TCP lane when it announces one and it answers, else over the P2P daemons
(``open_stream``). A node's error surfaces as an exception whose text starts with its ``ErrorCode``
(``NodeRPCError.code_of`` reads it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from nectar.wire.announce import ServerInfo
from nectar.wire.direct import DirectCallError, call_stream_direct
from nectar.wire.messages import (
    AuditCall,
    AuditReply,
    BackwardCall,
    BackwardReply,
    Cancel,
    Flush,
    ForwardCall,
    ForwardReply,
    InferenceReply,
    InfoCall,
    InfoReply,
    Open,
    Opened,
    Pay,
    Step,
    decode_inference_reply,
)
from nectar.wire.protocol import RPC_INFERENCE, ErrorCode, NodeRPCError
from nectar.wire.transport import call_stream, first_response

logger = logging.getLogger(__name__)


async def open_stream(
    p2p: P2P,
    peer_id: PeerID,
    info: ServerInfo | None,
    name: str,
    requests: AsyncIterator[runtime_pb2.ExpertRequest],
    *,
    direct: bool = True,
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Opens the stream RPC ``name``: the node's direct lane where ``info`` announces one and it answers, else P2P.
    A lane that refuses the connection before reading it (``lane_full``: others at this address hold its connections,
    e.g. behind one NAT) costs nothing: the same requests go over P2P instead (issue 22)."""
    if not (direct and info is not None and info.direct_address):
        return await call_stream(p2p, peer_id, name, requests)
    tap = _Replayable(requests)
    try:
        responses = await call_stream_direct(info.direct_address, name, tap.iterate())
    except (OSError, ValueError) as e:  # not reachable from here (another host, a firewall): P2P still is
        logger.debug(f"Direct lane {info.direct_address} of {peer_id} unreachable ({e}); using P2P")
        tap.keep = False
        return _closing(tap, await call_stream(p2p, peer_id, name, tap.iterate()))
    return _direct_else_p2p(tap, responses, lambda: call_stream(p2p, peer_id, name, tap.iterate()))


class _Replayable:
    """A request stream that can be read again from its first request until the node has answered once: a direct lane
    that refused the connection read none of it. One reader at a time; what it read is dropped once ``keep`` is off."""

    def __init__(self, source: AsyncIterator):
        self.items: list = []
        self.base = 0  # index of items[0] in the stream
        self.keep = True
        self.closed, self.error = False, None
        self.arrived = asyncio.Event()
        # a task owns the caller's iterator, so cancelling a reader never closes the caller's generator
        self.pump = asyncio.create_task(self._pump(source))

    async def _pump(self, source: AsyncIterator) -> None:
        try:
            async for item in source:
                self.items.append(item)
                self.arrived.set()
        except Exception as e:
            self.error = e
        finally:
            self.closed = True
            self.arrived.set()

    async def iterate(self) -> AsyncIterator:
        index = 0
        while True:
            while index - self.base >= len(self.items):
                if self.closed:
                    if self.error is not None:
                        raise self.error
                    return
                self.arrived.clear()
                await self.arrived.wait()
            item = self.items[index - self.base]
            index += 1
            if not self.keep:
                del self.items[: index - self.base]
                self.base = index
            yield item


async def _closing(tap: _Replayable, responses: AsyncIterator) -> AsyncIterator:
    try:
        async for response in responses:
            yield response
    finally:
        tap.pump.cancel()


async def _direct_else_p2p(tap: _Replayable, responses: AsyncIterator, p2p_stream) -> AsyncIterator:
    try:
        try:
            async for response in responses:
                tap.keep = False  # the node answered: no replay from here on
                yield response
            if not tap.keep:
                return
            # closed before any answer: a refusing lane's reset can swallow its lane_full frame (the client's write
            # crossed the close), so treat it as that refusal
            logger.info("The direct lane closed before answering; sending the same requests over P2P")
        except (DirectCallError, OSError) as e:
            refused = not isinstance(e, DirectCallError) or NodeRPCError.code_of(e) == ErrorCode.LANE_FULL
            if not tap.keep or not refused:
                raise
            logger.info(f"{e}; sending the same requests over P2P")
        tap.keep = False
        async for response in await p2p_stream():
            yield response
    finally:
        tap.pump.cancel()


async def call_unary(
    p2p: P2P,
    peer_id: PeerID,
    info: ServerInfo | None,
    name: str,
    request: runtime_pb2.ExpertRequest,
    *,
    direct: bool = True,
    timeout: float | None = None,
) -> runtime_pb2.ExpertResponse:
    """One request, one response, on the fastest lane."""
    return await first_response(
        lambda requests: open_stream(p2p, peer_id, info, name, requests, direct=direct),
        request,
        peer=peer_id,
        name=name,
        timeout=timeout,
    )


async def call_forward(
    p2p: P2P,
    peer_id: PeerID,
    info: ServerInfo | None,
    call: ForwardCall,
    *,
    direct: bool = True,
    timeout: float | None = None,
) -> ForwardReply:
    response = await call_unary(p2p, peer_id, info, call.rpc, call.to_request(), direct=direct, timeout=timeout)
    return ForwardReply.decode(response)


async def call_backward(
    p2p: P2P,
    peer_id: PeerID,
    info: ServerInfo | None,
    call: BackwardCall,
    *,
    direct: bool = True,
    timeout: float | None = None,
) -> BackwardReply:
    response = await call_unary(p2p, peer_id, info, call.rpc, call.to_request(), direct=direct, timeout=timeout)
    return BackwardReply.decode(response)


async def call_audit(
    p2p: P2P,
    peer_id: PeerID,
    info: ServerInfo | None,
    call: AuditCall,
    *,
    direct: bool = True,
    timeout: float | None = None,
) -> AuditReply:
    response = await call_unary(p2p, peer_id, info, call.rpc, call.to_request(), direct=direct, timeout=timeout)
    return AuditReply.decode(response)


async def call_info(
    p2p: P2P, peer_id: PeerID, info: ServerInfo | None = None, *, direct: bool = True, timeout: float | None = None
) -> dict:
    """The node's info (``InfoReply.info``): its announcement, model, version and counters."""
    call = InfoCall()
    response = await call_unary(p2p, peer_id, info, call.rpc, call.to_request(), direct=direct, timeout=timeout)
    return InfoReply.decode(response).info


class InferenceStub:
    """A client's end of one open inference stream (on the event loop that opened it).

    ``send`` queues a request (it leaves in order, without waiting); ``receive`` takes the next reply, decoded
    (``Opened``, ``StepReply``, ``ReceiptMessage`` or ``PushMissing``); ``close`` ends the stream after what is
    queued. Made by ``open_inference``.
    """

    def __init__(self, uid: str):
        self.uid = uid
        self.opened: Opened | None = None  # the node's answer to an open without a first step
        self._queue: asyncio.Queue = asyncio.Queue()
        self._responses: AsyncIterator[runtime_pb2.ExpertResponse] | None = None

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    def send(self, message: Step | Pay | Flush | Cancel) -> None:
        self._queue.put_nowait(message.to_request(self.uid))

    def send_request(self, request: runtime_pb2.ExpertRequest) -> None:
        """Queues an encoded request as it is (the open, or a raw request)."""
        self._queue.put_nowait(request)

    async def receive(self) -> InferenceReply:
        return decode_inference_reply(await self._responses.__anext__())

    def close(self) -> None:
        self._queue.put_nowait(None)


async def open_inference(
    p2p: P2P,
    peer_id: PeerID,
    info: ServerInfo | None,
    message: Open,
    *,
    direct: bool = True,
    timeout: float | None = None,
) -> InferenceStub:
    """Opens an inference stream and sends ``message``; without a first step in it, waits for the node's
    ``Opened`` (``stub.opened``). ``timeout`` bounds opening the stream and, separately, that answer. On failure the
    stream is closed and the error raised."""
    stub = InferenceStub(message.uid)
    try:
        stub._responses = (
            await asyncio.wait_for(
                open_stream(p2p, peer_id, info, RPC_INFERENCE, stub._requests(), direct=direct), timeout
            )
        ).__aiter__()
        stub.send_request(message.to_request())
        if message.first_step is None:
            reply = await asyncio.wait_for(stub.receive(), timeout)
            if not isinstance(reply, Opened):
                raise ValueError(f"{peer_id} answered an open with {type(reply).__name__}, not Opened")
            stub.opened = reply
    except BaseException:
        stub.close()
        raise
    return stub


__all__ = [
    "InferenceStub",
    "call_audit",
    "call_backward",
    "call_forward",
    "call_info",
    "call_unary",
    "open_inference",
    "open_stream",
]
