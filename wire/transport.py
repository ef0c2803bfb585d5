"""Stream RPC framing on top of hivemind's P2P daemon, with errors a client can read.

hivemind's own protobuf stream handler drops the connection silently when a peer sends bytes that are not a valid
message; Nectar answers such a peer with a ``bad_request`` error instead, then closes only that stream.

A node ends a stream after its caller has: when the handler is done it waits for the caller's end-of-stream marker,
then for the caller to close its side (``CALLER_LINGER``; callers that read until the node closes get it then).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing, suppress

from hivemind.p2p import P2P, P2PContext, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from nectar.wire.protocol import MAX_METADATA_BYTES, MAX_TOKENS_PER_REQUEST, ErrorCode, NodeRPCError, peer_text
from nectar.wire.request_stream import RequestStream

logger = logging.getLogger(__name__)

CALLER_CLOSE_TIMEOUT = 10.0  # s a finished stream waits for the caller's end of stream before closing
CALLER_LINGER = 1.0  # s it then waits for the caller to close its side (callers that read to the end don't)
DEFAULT_MAX_FRAME_BYTES = 64 * 1024**2  # a served stream's frame limit where none is named (a node names its own)
RESPONSE_FRAME_LIMIT = 1024**3  # the largest answer a caller reads (a node lying about a length gets no more)


def frame_limit(hidden_size: int, max_tokens: int = MAX_TOKENS_PER_REQUEST) -> int:
    """The largest request a node of this hidden size can need: a backward carries inputs, output gradients and
    prompts, each at most ``max_tokens`` rows of float32 activations, plus its metadata. A frame header declaring more
    is refused before its body is read (issue 22: a header declaring a huge length made the node buffer all of it)."""
    return 3 * max_tokens * hidden_size * 4 + MAX_METADATA_BYTES + 64 * 1024


class FrameTooLarge(ValueError):
    """A frame header declared more bytes than the reader takes; nothing of the body was read."""


class AnswerTooLarge(P2PHandlerError):
    """A called node's answer declared more bytes than the caller takes (``FrameTooLarge``); its body was not read."""


async def receive_frame(message_type, reader: asyncio.StreamReader, max_bytes: int):
    """``P2P.receive_protobuf`` with the declared length checked before the body is read: (message, None) or
    (None, RPCError). Raises ``FrameTooLarge`` past ``max_bytes``, ``IncompleteReadError`` on a closed stream."""
    marker = await reader.readexactly(1)
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise TypeError("Invalid Protobuf message type")
    size = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    if size > max_bytes:
        raise FrameTooLarge(
            f"a frame of {size} bytes; this node takes at most {max_bytes} bytes per message (at most "
            f"{MAX_TOKENS_PER_REQUEST} tokens of activations): split the request"
        )
    message = message_type() if marker == P2P.MESSAGE_MARKER else RPCError()
    message.ParseFromString(await reader.readexactly(size))
    return (message, None) if marker == P2P.MESSAGE_MARKER else (None, message)


async def receive_answers(
    reader: asyncio.StreamReader,
    max_frame_bytes: int,
    fail: Callable[[RPCError | FrameTooLarge], Exception],
    closed: tuple[type[BaseException], ...] = (asyncio.IncompleteReadError,),
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """A called stream's answers until the node closes it (``closed``); an error frame, or an answer declaring more
    than ``max_frame_bytes`` (refused before it is read), raises ``fail(it)``. Both lanes' callers read through this."""
    while True:
        try:
            response, error = await receive_frame(runtime_pb2.ExpertResponse, reader, max_frame_bytes)
        except closed:
            return
        except FrameTooLarge as e:
            raise fail(e) from None
        if error is not None:
            raise fail(error)
        yield response


async def send_message(
    message: runtime_pb2.ExpertResponse | runtime_pb2.ExpertRequest | RPCError, writer: asyncio.StreamWriter
) -> None:
    """One protobuf message (or ``RPCError``) in hivemind's stream framing, as a single write: hivemind's
    ``P2P.send_protobuf`` writes marker, length and body separately, three send() calls per message."""
    marker = P2P.ERROR_MARKER if isinstance(message, RPCError) else P2P.MESSAGE_MARKER
    body = message.SerializeToString()
    writer.write(b"".join((marker, len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER), body)))
    await writer.drain()


async def send_data(data: bytes, writer: asyncio.StreamWriter) -> None:
    """Raw bytes with their length header, as a single write (see ``send_message``)."""
    writer.write(len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data)
    await writer.drain()


StreamHandler = Callable[
    [AsyncIterator[runtime_pb2.ExpertRequest], P2PContext], AsyncIterator[runtime_pb2.ExpertResponse]
]


async def serve_stream(
    p2p: P2P,
    name: str,
    handler: StreamHandler,
    *,
    max_prefetch: int = 8,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> None:
    """Registers ``handler`` as the stream RPC ``name``; one task per incoming stream."""
    handle = stream_handler(
        name, handler, local_id=p2p.peer_id, max_prefetch=max_prefetch, max_frame_bytes=max_frame_bytes
    )

    async def handle_stream(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await handle(stream_info.peer_id, reader, writer)

    await p2p.add_binary_stream_handler(name, handle_stream)


def stream_handler(
    name: str,
    handler: StreamHandler,
    *,
    local_id,
    max_prefetch: int = 8,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
):
    """``handler`` as a coroutine over one byte stream (P2P daemon stream or direct TCP connection), framed as
    hivemind frames protobuf streams: a marker byte, an 8-byte length, the message. A frame over ``max_frame_bytes``
    is refused (``too_large``) from its header; requests read ahead of the handler hold at most that many bytes too."""

    async def handle_stream(remote_id, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        context = P2PContext(handle_name=name, local_id=local_id, remote_id=remote_id)
        requests = RequestStream(max_prefetch, max_bytes=max_frame_bytes)

        async def process() -> None:
            try:
                async for response in handler(requests, context):
                    await send_message(response, writer)
            except NodeRPCError as e:
                with suppress(Exception):
                    await send_message(RPCError(message=str(e)), writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            except Exception as e:
                logger.warning(f"{name} failed for {remote_id}", exc_info=True)
                with suppress(Exception):
                    await send_message(RPCError(message=f"{ErrorCode.INTERNAL.value}: {e}"), writer)

        async def receive() -> None:
            """Queues the caller's requests as they come: one reader for the stream's life, not a task per message."""
            while True:
                try:
                    request, _ = await receive_frame(runtime_pb2.ExpertRequest, reader, max_frame_bytes)
                except asyncio.IncompleteReadError:
                    await requests.put(None)  # the caller closed or died
                    return
                except FrameTooLarge as e:  # refused from its header: the body is never buffered
                    await requests.put(NodeRPCError(ErrorCode.TOO_LARGE, str(e)))
                    return
                except Exception as e:  # garbage on the wire: tell the caller, then stop reading it
                    await requests.put(NodeRPCError(ErrorCode.BAD_REQUEST, f"unreadable message ({e})"))
                    return
                await requests.put(request, size=0 if request is None else request.ByteSize())  # None: caller's end
                if request is None:
                    return

        with closing(writer):
            processing = asyncio.create_task(process())
            receiving = asyncio.create_task(receive())
            try:
                await processing
                # Close after the caller, not before: a P2P daemon whose side closes first resets the stream, and
                # the reset can discard answers the caller's daemon holds but has not passed on yet (1-4 lost answers
                # per 1000 calls on 2 loaded cores). Late messages are ignored.
                with suppress(Exception):
                    await asyncio.wait_for(_drain(requests, receiving), CALLER_CLOSE_TIMEOUT)
                    await asyncio.wait_for(_until_closed(reader), CALLER_LINGER)
            except Exception:
                logger.debug(f"{name}: stream from {remote_id} ended abnormally", exc_info=True)
            finally:
                processing.cancel()
                receiving.cancel()

    return handle_stream


async def _drain(requests: RequestStream, receiving: asyncio.Task) -> None:
    """Takes (and drops) what the caller still sends until it ends its stream."""
    while not receiving.done():
        with suppress(Exception):
            if await requests.next() is None:
                break
    await receiving


async def _until_closed(reader: asyncio.StreamReader) -> None:
    """Reads (and drops) what is left until the caller closes its side of the stream."""
    while await reader.read(1 << 16):
        pass


async def call_stream(
    p2p: P2P,
    peer_id: PeerID,
    name: str,
    requests: AsyncIterator[runtime_pb2.ExpertRequest],
    *,
    max_frame_bytes: int = RESPONSE_FRAME_LIMIT,
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Opens the stream RPC ``name`` at ``peer_id`` (hivemind's ``iterate_protobuf_handler``, with each answer's
    declared length checked before it is read); remote errors surface as ``P2PHandlerError`` with the text."""
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id, name)

    def fail(error: RPCError | FrameTooLarge) -> Exception:
        if isinstance(error, FrameTooLarge):
            return AnswerTooLarge(f"{peer_id} answered {name} with {error}")
        return P2PHandlerError(f"Failed to call handler `{name}` at {peer_id}: {peer_text(error.message)}")

    async def write_requests() -> None:
        async for request in requests:
            await send_message(request, writer)
        await send_message(P2P.END_OF_STREAM, writer)

    async def read_responses() -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with closing(writer):
            try:
                async for response in receive_answers(reader, max_frame_bytes, fail):
                    yield response
                await writing
            finally:
                writing.cancel()

    writing = asyncio.create_task(write_requests())
    return read_responses()


async def call_once(
    p2p: P2P,
    peer_id: PeerID,
    name: str,
    request: runtime_pb2.ExpertRequest,
    *,
    timeout: float | None = None,
    max_frame_bytes: int = RESPONSE_FRAME_LIMIT,
) -> runtime_pb2.ExpertResponse:
    return await first_response(
        lambda requests: call_stream(p2p, peer_id, name, requests, max_frame_bytes=max_frame_bytes),
        request,
        peer=peer_id,
        name=name,
        timeout=timeout,
    )


async def first_response(
    open_stream: Callable[[AsyncIterator], Awaitable[AsyncIterator]],
    request: runtime_pb2.ExpertRequest,
    *,
    peer,
    name: str,
    timeout: float | None = None,
) -> runtime_pb2.ExpertResponse:
    """Sends one request on a stream ``open_stream(requests)`` opens (any transport); returns the first answer."""

    async def one():
        yield request

    async def run():
        async for response in await open_stream(one()):
            return response
        raise ConnectionError(f"{peer} closed {name} without answering")

    return await asyncio.wait_for(run(), timeout)
