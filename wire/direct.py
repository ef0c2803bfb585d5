"""A direct TCP lane for node RPCs: the same streams as over the P2P daemons, minus two daemon hops each way.

Over libp2p, every message crosses the caller's P2P daemon, the network and the callee's daemon (each a process and
a unix socket away), which costs about a millisecond per round trip on loopback. A node may also listen on a plain
TCP port and announce it (``ServerInfo.direct_address``); clients that can reach it open their streams there. The
framing is hivemind's (marker byte, 8-byte length, protobuf), preceded by one hello frame naming the RPC.

The lane is plaintext and unauthenticated, so it is for loopback and trusted LANs (a node enables it with
``--direct-port``). A client still checks every receipt against the node's announced Ethereum address, so a
stranger answering on that port cannot pass as the node.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import closing, suppress

from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils import MSGPackSerializer

from nectar.wire.protocol import ErrorCode, peer_text
from nectar.wire.transport import (
    DEFAULT_MAX_FRAME_BYTES,
    RESPONSE_FRAME_LIMIT,
    FrameTooLarge,
    StreamHandler,
    receive_answers,
    send_data,
    send_message,
    stream_handler,
)

logger = logging.getLogger(__name__)

HELLO_LIMIT = 1024  # bytes; the hello frame only names an RPC
HELLO_TIMEOUT = 10.0  # s a connection may take to say which RPC it wants
DEFAULT_CONNECTIONS_PER_ADDRESS = 256  # open connections one remote host may hold (each carries one stream)


class DirectCallError(Exception):
    """The node answered with an error (the text starts with its ``ErrorCode``) or broke the stream."""


class DirectServer:
    """Serves ``handlers`` (RPC name -> stream handler) on a TCP port; one connection carries one stream.

    :param max_frame_bytes: frames declaring more are refused from their header (``transport.frame_limit``)
    :param max_connections_per_address: open connections one remote host may hold; more are answered with an error
        and closed, so one address cannot take every socket and buffer of the node
    """

    def __init__(
        self,
        handlers: Mapping[str, StreamHandler],
        *,
        local_id,
        max_prefetch: int = 8,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_connections_per_address: int = DEFAULT_CONNECTIONS_PER_ADDRESS,
    ):
        self.handlers = {
            name: stream_handler(
                name, handler, local_id=local_id, max_prefetch=max_prefetch, max_frame_bytes=max_frame_bytes
            )
            for name, handler in handlers.items()
        }
        self.max_connections_per_address = max_connections_per_address
        self.connections: dict[str, int] = {}  # remote host -> open connections
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int = 0) -> int:
        """Starts listening; returns the bound port."""
        self.server = await asyncio.start_server(self._serve_connection, host, port)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote = writer.get_extra_info("peername")
        host = remote[0] if remote else "?"
        if self.connections.get(host, 0) >= self.max_connections_per_address:
            with closing(writer), suppress(Exception):
                await send_message(
                    RPCError(
                        message=f"{ErrorCode.LANE_FULL.value}: {host} already holds {self.max_connections_per_address} "
                        f"connections to this node's direct lane (its limit per address): close idle ones, or use P2P"
                    ),
                    writer,
                )
            return
        self.connections[host] = self.connections.get(host, 0) + 1
        try:
            await self._serve(host, remote, reader, writer)
        finally:
            if self.connections[host] <= 1:
                del self.connections[host]
            else:
                self.connections[host] -= 1

    async def _serve(self, host: str, remote, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        remote_id = f"tcp:{host}:{remote[1]}" if remote else "tcp:?"
        try:
            name = await asyncio.wait_for(self._read_hello(reader), HELLO_TIMEOUT)
        except Exception as e:
            with closing(writer), suppress(Exception):
                await send_message(RPCError(message=f"{ErrorCode.BAD_REQUEST.value}: {e}"), writer)
            return
        handle = self.handlers.get(name)
        if handle is None:
            with closing(writer), suppress(Exception):
                await send_message(
                    RPCError(
                        message=f"{ErrorCode.BAD_REQUEST.value}: unknown RPC {name!r}; "
                        f"this node serves {sorted(self.handlers)}"
                    ),
                    writer,
                )
            return
        await handle(remote_id, reader, writer)

    @staticmethod
    async def _read_hello(reader: asyncio.StreamReader) -> str:
        size = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
        if size > HELLO_LIMIT:
            raise ValueError(f"hello frame of {size} bytes; it must name an RPC in at most {HELLO_LIMIT} bytes")
        hello = MSGPackSerializer.loads(await reader.readexactly(size))
        if not isinstance(hello, dict) or not isinstance(hello.get("rpc"), str):
            raise ValueError("hello frame must be a msgpack map with an 'rpc' name")
        return hello["rpc"]


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"direct address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


async def send_hello(name: str, writer: asyncio.StreamWriter) -> None:
    """The frame that opens a connection to a node's direct lane: which RPC the stream is for."""
    await send_data(MSGPackSerializer.dumps({"rpc": name}), writer)


async def call_stream_direct(
    address: str,
    name: str,
    requests: AsyncIterator[runtime_pb2.ExpertRequest],
    *,
    max_frame_bytes: int = RESPONSE_FRAME_LIMIT,
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """Opens the stream RPC ``name`` at a node's direct address (what ``transport.call_stream`` does over P2P); an
    answer declaring more than ``max_frame_bytes`` is refused before it is read."""
    host, port = parse_address(address)
    reader, writer = await asyncio.open_connection(host, port)
    await send_hello(name, writer)

    def fail(error: RPCError | FrameTooLarge) -> Exception:
        if isinstance(error, FrameTooLarge):
            return DirectCallError(f"{name} at {address} answered with {error}")
        return DirectCallError(f"{name} at {address} failed: {peer_text(error.message)}")

    async def write_requests() -> None:
        async for request in requests:
            await send_message(request, writer)
        await send_message(P2P.END_OF_STREAM, writer)

    async def read_responses() -> AsyncIterator[runtime_pb2.ExpertResponse]:
        with closing(writer):
            try:
                # ConnectionError too: the node closed the stream
                closed = (asyncio.IncompleteReadError, ConnectionError)
                async for response in receive_answers(reader, max_frame_bytes, fail, closed):
                    yield response
                if writing.done():  # a write that failed for another reason than the node going away
                    with suppress(ConnectionError, asyncio.CancelledError):
                        writing.result()
                # else: the node ended the stream (or died) while the caller may still send: nothing to wait for
            finally:
                writing.cancel()

    writing = asyncio.create_task(write_requests())
    return read_responses()
