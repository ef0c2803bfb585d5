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
from nectar.wire.direct import call_stream_direct
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
from nectar.wire.protocol import RPC_INFERENCE
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
    """Opens the stream RPC ``name``: the node's direct lane where ``info`` announces one and it answers, else P2P."""
    if direct and info is not None and info.direct_address:
        try:
            return await call_stream_direct(info.direct_address, name, requests)
        except (OSError, ValueError) as e:  # not reachable from here (another host, a firewall): P2P still is
            logger.debug(f"Direct lane {info.direct_address} of {peer_id} unreachable ({e}); using P2P")
    return await call_stream(p2p, peer_id, name, requests)


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
