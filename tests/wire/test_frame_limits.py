"""A node that lies about a frame's length cannot make its caller buffer it (issue 22): real sockets, a fake node."""

from __future__ import annotations

import asyncio
import os

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from nectar.wire.direct import DirectCallError, call_stream_direct
from nectar.wire.transport import send_message


async def first_answer_error(fake_node) -> DirectCallError:
    """The error a direct-lane caller raises on the first answer of ``fake_node`` (an asyncio stream handler)."""
    server = await asyncio.start_server(fake_node, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def requests():
        yield runtime_pb2.ExpertRequest(uid="x")

    try:
        responses = await call_stream_direct(f"127.0.0.1:{port}", "nectar1.info", requests())
        with pytest.raises(DirectCallError) as error:
            await asyncio.wait_for(responses.__anext__(), 5)
        return error.value
    finally:
        server.close()


def test_a_caller_refuses_an_answer_declaring_more_than_its_limit():
    async def scenario():
        got = asyncio.get_running_loop().create_future()

        async def lying_node(reader, writer):
            await reader.read(1024)  # the hello and the request
            writer.write(P2P.MESSAGE_MARKER + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
            try:
                for _ in range(64):  # 64 MiB, then it hangs on: the caller must not wait for the rest
                    writer.write(b"\0" * (1 << 20))
                    await writer.drain()
                await asyncio.wait_for(got, 10)
            except (ConnectionError, TimeoutError):
                pass
            writer.close()

        try:
            assert str(1 << 40) in str(await first_answer_error(lying_node))
        finally:
            got.set_result(None)

    asyncio.run(scenario())


def test_a_nodes_error_text_is_cut_where_the_caller_reads_it():
    """A node writes its errors' text: a megabyte of it (within the frame limit) becomes 1,000 characters in the
    exception every caller (client, ledger audit, pushing node) logs or passes on."""

    async def shouting_node(reader, writer):
        await reader.read(1024)
        await send_message(RPCError(message="bad_request: " + "x" * 2**20), writer)
        writer.close()

    error = str(asyncio.run(first_answer_error(shouting_node)))
    assert "bad_request" in error and len(error) < 1200 and "more characters" in error


def test_an_adapter_answer_over_the_callers_cap_is_refused_from_its_header_over_p2p():
    """Issue 21: the ledger fetches an audited node's adapter files under a byte cap; an answer declaring more is
    refused from its frame header (``AnswerTooLarge``, nothing of it read), one within the cap is read whole. Real
    P2P daemons, the node's stream framing."""
    from nectar.wire.messages import AdapterCall, AdapterReply
    from nectar.wire.protocol import RPC_ADAPTER
    from nectar.wire.transport import AnswerTooLarge, call_once, serve_stream

    weights = os.urandom(4 << 20)

    async def scenario():
        node = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        ledger = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await node.get_visible_maddrs())

        async def answer(requests, context):
            async for _ in requests:
                yield AdapterReply(b"{}", weights).to_response()
                return

        try:
            await serve_stream(node, RPC_ADAPTER, answer)
            request = AdapterCall(bytes(32)).to_request()
            with pytest.raises(AnswerTooLarge, match="at most 1048576 bytes"):
                await call_once(ledger, node.peer_id, RPC_ADAPTER, request, timeout=30, max_frame_bytes=1 << 20)
            response = await call_once(ledger, node.peer_id, RPC_ADAPTER, request, timeout=30, max_frame_bytes=8 << 20)
            assert AdapterReply.decode(response) == AdapterReply(b"{}", weights)
        finally:
            await ledger.shutdown()
            await node.shutdown()

    asyncio.run(scenario())
