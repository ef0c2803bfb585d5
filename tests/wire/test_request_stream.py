"""The queue between a stream's reader and its handler (wire/request_stream.py)."""

from __future__ import annotations

import asyncio

import pytest

from nectar.wire.protocol import ErrorCode, NodeRPCError
from nectar.wire.request_stream import RequestStream, RequestTimeout


def test_a_timeout_loses_no_request_and_readable_takes_nothing():
    async def scenario():
        stream = RequestStream()
        with pytest.raises(RequestTimeout):
            await stream.next(0.01)
        readable = stream.readable()
        assert not readable.done()
        asyncio.get_running_loop().call_later(0.01, lambda: asyncio.ensure_future(stream.put("first")))
        await asyncio.wait_for(readable, 1)
        assert await stream.next(0.01) == "first"  # readable did not take it
        await stream.put("second")
        await stream.put(None)  # the caller ended the stream
        assert [item async for item in stream] == ["second"]
        assert await stream.next(0.01) is None  # and stays ended

    asyncio.run(scenario())


def test_the_reader_waits_while_the_handler_is_behind():
    async def scenario():
        stream = RequestStream(max_prefetch=2)
        await stream.put(1)
        await stream.put(2)
        third = asyncio.ensure_future(stream.put(3))
        await asyncio.sleep(0.01)
        assert not third.done()  # back-pressure on the caller
        assert await stream.next() == 1
        await asyncio.wait_for(third, 1)
        assert [await stream.next(), await stream.next()] == [2, 3]

    asyncio.run(scenario())


def test_an_error_the_reader_queues_reaches_the_handler_in_place_of_a_request():
    async def scenario():
        stream = RequestStream()
        await stream.put("request")
        await stream.put(NodeRPCError(ErrorCode.BAD_REQUEST, "unreadable message"))
        assert await stream.next() == "request"
        with pytest.raises(NodeRPCError, match="bad_request: unreadable message"):
            await stream.next()
        assert await stream.next() is None

    asyncio.run(scenario())


def test_requests_read_ahead_are_bounded_in_bytes_too():
    """Many frames each under the frame limit cannot pile up past the stream's byte budget (issue 22)."""

    async def scenario():
        stream = RequestStream(max_prefetch=8, max_bytes=100)
        await stream.put("a", size=60)
        second = asyncio.ensure_future(stream.put("b", size=60))
        await asyncio.sleep(0.01)
        assert not second.done()  # 120 bytes would be queued: the reader waits
        assert await stream.next() == "a"
        await asyncio.wait_for(second, 1)
        await stream.put(None)  # the end of the stream is never held back
        assert [item async for item in stream] == ["b"]

    asyncio.run(scenario())
