"""Which event loop a node and a client run: uvloop where installed, asyncio's own on request."""

from __future__ import annotations

import asyncio

import pytest

from nectar.wire.event_loop import loop_kind, new_event_loop


def _run_on(loop: asyncio.AbstractEventLoop) -> int:
    async def echo() -> int:  # a real TCP round trip on the loop, as the direct lane does
        async def serve(reader, writer):
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        writer.write(b"hello")
        data = await reader.readexactly(5)
        writer.close()
        server.close()
        await server.wait_closed()
        return len(data)

    try:
        return loop.run_until_complete(echo())
    finally:
        loop.close()


def test_uvloop_by_default_and_asyncio_on_request(monkeypatch):
    monkeypatch.delenv("NECTAR_EVENT_LOOP", raising=False)
    assert loop_kind() == "uvloop"  # a project dependency on Linux
    loop = new_event_loop()
    assert type(loop).__module__.startswith("uvloop")
    assert _run_on(loop) == 5
    monkeypatch.setenv("NECTAR_EVENT_LOOP", "asyncio")
    loop = new_event_loop()
    assert isinstance(loop, asyncio.BaseEventLoop) and not type(loop).__module__.startswith("uvloop")
    assert _run_on(loop) == 5


def test_an_unknown_choice_says_what_is_allowed(monkeypatch):
    monkeypatch.setenv("NECTAR_EVENT_LOOP", "trio")
    with pytest.raises(ValueError, match="NECTAR_EVENT_LOOP must be auto, uvloop or asyncio"):
        new_event_loop()
