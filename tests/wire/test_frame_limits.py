"""A node that lies about a frame's length cannot make its caller buffer it (issue 22): real sockets, a fake node."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from nectar.wire.direct import DirectCallError, call_stream_direct


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

        server = await asyncio.start_server(lying_node, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def requests():
            yield runtime_pb2.ExpertRequest(uid="x")

        try:
            responses = await call_stream_direct(f"127.0.0.1:{port}", "nectar1.info", requests())
            with pytest.raises(DirectCallError, match=str(1 << 40)):
                await asyncio.wait_for(responses.__anext__(), 5)
        finally:
            got.set_result(None)
            server.close()

    asyncio.run(scenario())
