"""A background event loop with the DHT's P2P replica: the async core behind the client's sync API."""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Coroutine

import hivemind

from nectar.wire.announce import AnnouncementValidator
from nectar.wire.event_loop import new_event_loop

logger = logging.getLogger(__name__)


class ClientRuntime:
    """Owns a client-mode DHT, a loop thread and a P2P replica; ``run(coro)`` executes on that loop."""

    def __init__(self, initial_peers):
        if not initial_peers:
            raise ValueError("No initial peers: pass initial_peers=[...] (a multiaddr printed by `nectar dht` or "
                             "`nectar node`) or set NECTAR_INITIAL_PEERS")
        self.dht = hivemind.DHT(initial_peers=list(initial_peers), client_mode=True, start=True,
                                record_validators=[AnnouncementValidator(None)], num_workers=4)
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="nectar-client-loop", daemon=True)
        self._thread.start()
        self.p2p = self.run(self.dht.replicate_p2p())

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def shutdown(self) -> None:
        """Closes the P2P replica and the DHT, then stops the loop (idempotent)."""
        if not self.loop.is_running():
            return
        try:
            self.run(self._close_p2p(), timeout=10)
        except Exception:
            logger.debug("P2P replica did not close cleanly", exc_info=True)
        try:
            self.dht.shutdown()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)

    async def _close_p2p(self) -> None:
        await self.p2p.shutdown()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
