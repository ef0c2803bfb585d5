"""Which event loop a node and a client run: uvloop where installed, asyncio's own on request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from nectar.wire.event_loop import loop_kind, new_event_loop, run_on_loop


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


@pytest.fixture
def loop_thread():
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_run_on_loop_returns_raises_and_times_out_as_run_coroutine_threadsafe(loop_thread):
    async def value():
        return threading.current_thread()

    assert run_on_loop(loop_thread, value()) is not threading.current_thread()  # ran on the loop's thread

    async def fails():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        run_on_loop(loop_thread, fails())
    finished = threading.Event()

    async def slow():
        await asyncio.sleep(0.3)
        finished.set()

    with pytest.raises(TimeoutError):
        run_on_loop(loop_thread, slow(), 0.05)
    assert finished.wait(5)  # a timeout leaves the coroutine running, as run_coroutine_threadsafe's does

    async def cancelled():
        asyncio.current_task().cancel()
        await asyncio.sleep(1)

    with pytest.raises(concurrent.futures.CancelledError):
        run_on_loop(loop_thread, cancelled())
    with pytest.raises(TypeError, match="needs a coroutine"):
        run_on_loop(loop_thread, lambda: None)


def test_after_runs_on_the_loop_after_a_success_and_before_the_next_call(loop_thread):
    order = []

    async def step(name):
        order.append(name)
        return name

    assert run_on_loop(loop_thread, step("first"), after=lambda: order.append("after first")) == "first"
    run_on_loop(loop_thread, step("second"))  # queued by the caller at once: the check still comes first
    assert order == ["first", "after first", "second"]

    async def fails():
        raise ValueError("no")

    with pytest.raises(ValueError):
        run_on_loop(loop_thread, fails(), after=lambda: order.append("after a failure"))
    run_on_loop(loop_thread, step("third"))
    assert order[-1] == "third" and "after a failure" not in order
