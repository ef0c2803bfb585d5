"""A caller cannot make a node buffer without bound (issue 22): a frame header declaring a huge length is refused
before its body is read, on the P2P lane and on the direct lane, and one address cannot hold more direct-lane
connections than the node allows. After each attack an honest client still generates."""

from __future__ import annotations

import asyncio
import socket
import time

import psutil
import pytest
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto.p2pd_pb2 import RPCError
from hivemind.utils import MSGPackSerializer

from nectar.node.local_swarm import LocalSwarm
from nectar.wire.direct import parse_address
from nectar.wire.protocol import RPC_INFERENCE

pytestmark = pytest.mark.slow
CONNECTIONS = 8  # the node's --direct-connections-per-address here
FLOOD = 256 * 1024**2  # bytes streamed after the lying header (main buffered all of it: +771 MiB RSS for 768 MiB)
GROWTH = 64 * 1024**2  # what the node may grow by meanwhile (allocator noise, a step of the honest client)
HUGE = 1 << 40  # the length the header declares


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    with LocalSwarm(workdir=tmp_path_factory.mktemp("swarm"), direct=True) as swarm:
        swarm.add_node(
            tiny_llama,
            blocks=(0, 4),
            name="solo",
            extra_args=["--throughput", "100", "--direct-connections-per-address", str(CONNECTIONS)],
        )
        swarm.wait_for_blocks(tiny_llama, 4)
        yield swarm


@pytest.fixture(scope="module")
def node(swarm):
    return swarm.nodes[0]


def _rss(node) -> int:
    return psutil.Process(node.process.pid).memory_info().rss


def _direct_address(model) -> str:
    servers = model.sequence_manager.servers()
    return next(info for block in servers.values() for info in block.values()).direct_address


def _hello(name: str) -> bytes:
    data = MSGPackSerializer.dumps({"rpc": name})
    return len(data).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + data


def _lying_header() -> bytes:
    return P2P.MESSAGE_MARKER + HUGE.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)


def _still_serves(model):
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def _error_text(marker: bytes, body: bytes) -> str:
    assert marker == P2P.ERROR_MARKER, f"expected an error frame, got marker {marker!r}"
    error = RPCError()
    error.ParseFromString(body)
    return error.message


async def _flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
    """Streams FLOOD bytes after a header declaring HUGE; returns the node's error text (None: it never answered)."""

    async def answer():
        marker = await reader.readexactly(1)
        size = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
        return _error_text(marker, await reader.readexactly(size))

    answering = asyncio.ensure_future(answer())
    chunk = b"\0" * (1 << 20)
    try:
        writer.write(_lying_header())
        for _ in range(FLOOD // len(chunk)):
            if answering.done():
                break
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the node closed the stream on us
    try:
        return await asyncio.wait_for(answering, 10)
    except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return None
    finally:
        writer.close()


def test_an_oversize_frame_on_the_direct_lane_is_refused_from_its_header(model, node):
    host, port = parse_address(_direct_address(model))

    async def attack():
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(_hello(RPC_INFERENCE))
        return await _flood(reader, writer)

    before = _rss(node)
    message = asyncio.run(attack())
    grown = _rss(node) - before
    assert grown < GROWTH, f"the node grew by {grown / 2**20:.0f} MiB while a caller streamed {FLOOD / 2**20:.0f} MiB"
    assert message is not None and "too_large" in message and str(HUGE) in message
    _still_serves(model)


def test_an_oversize_frame_on_the_p2p_lane_is_refused_from_its_header(model, node, swarm):
    peer = PeerID.from_base58(node.address.rsplit("/", 1)[-1])

    async def attack():
        _, reader, writer = await model.runtime.p2p.call_binary_stream_handler(peer, RPC_INFERENCE)
        return await _flood(reader, writer)

    before = _rss(node)
    message = model.runtime.run(attack(), timeout=120)
    grown = _rss(node) - before
    assert grown < GROWTH, f"the node grew by {grown / 2**20:.0f} MiB while a caller streamed {FLOOD / 2**20:.0f} MiB"
    assert message is not None and "too_large" in message
    _still_serves(model)


def test_one_address_cannot_hold_more_direct_connections_than_allowed(model):
    address = parse_address(_direct_address(model))
    held = [socket.create_connection(address, timeout=10) for _ in range(CONNECTIONS)]
    try:
        time.sleep(0.5)  # the node has accepted them all
        with socket.create_connection(address, timeout=5) as extra:
            reader = extra.makefile("rb")
            marker = reader.read(1)
            size = int.from_bytes(reader.read(P2P.HEADER_LEN), P2P.BYTEORDER)
            message = _error_text(marker, reader.read(size))
        assert message.startswith("lane_full:") and str(CONNECTIONS) in message
        # an honest client behind the same address (one NAT) still generates: the refused lane read nothing, so the
        # same requests go over P2P (before, it was told no node serves the blocks)
        _still_serves(model)
        _still_serves(model)
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.5)  # the node has seen them close: the address is under its limit again
    _still_serves(model)
