"""``ClientRuntime``: the one client-mode DHT peer of the client, the API gateway and the ledger.

It owns a client-mode DHT (reads announcements, never stores), an event-loop thread and a P2P handle for RPCs;
``run(coro)`` executes on that loop. Two ways to host the DHT:

- a ``hivemind.DHT`` child process (default: the DHT's own work stays off this process's GIL), or
- ``in_process=True``: a ``DHTNode`` on the loop thread, for processes that may not start children (Celery's
  prefork pool processes are daemonic).

Construction either succeeds or releases everything it started (the DHT process, its P2P daemon, the loop thread).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from collections.abc import Coroutine, Sequence
from functools import partial
from typing import Any

import hivemind

from nectar.wire.announce import AnnouncementValidator
from nectar.wire.event_loop import new_event_loop, run_on_loop

logger = logging.getLogger(__name__)


class ClientRuntime:
    """A client-mode DHT, a loop thread and a P2P handle; thread-safe, blocking methods.

    :param initial_peers: multiaddrs of swarm peers (``nectar.wire.peers.parse_peers``)
    :param in_process: host the DHT on the loop thread instead of a child process
    :param start_timeout: seconds to join the swarm
    """

    def __init__(
        self,
        initial_peers: Sequence[str],
        *,
        in_process: bool = False,
        start_timeout: float = 60.0,
        thread_name: str = "nectar-client-loop",
    ):
        if not initial_peers:
            raise ValueError(
                "No initial peers: pass initial_peers=[...] (a multiaddr printed by `nectar dht` or "
                "`nectar node`) or set NECTAR_INITIAL_PEERS"
            )
        self.initial_peers = list(initial_peers)
        self.dht: hivemind.DHT | None = None  # the child-process DHT
        self.node = None  # the in-process DHTNode
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=thread_name, daemon=True)
        self._thread.start()
        try:
            if in_process:
                self.node = self.run(self._create_node(), timeout=start_timeout)
                self.p2p = self.node.p2p
            else:
                self.dht = hivemind.DHT(
                    initial_peers=self.initial_peers,
                    client_mode=True,
                    start=False,
                    record_validators=[AnnouncementValidator(None)],
                    num_workers=4,
                )
                self.dht.run_in_background(await_ready=True, timeout=start_timeout)
                self.p2p = self.run(self.dht.replicate_p2p(), timeout=start_timeout)
        except BaseException:
            self.shutdown()
            raise

    async def _create_node(self):
        from hivemind.dht.node import DHTNode

        return await DHTNode.create(
            initial_peers=self.initial_peers, client_mode=True, record_validator=AnnouncementValidator(None)
        )

    @property
    def peer_id(self):
        return self.node.peer_id if self.node is not None else self.dht.peer_id

    def run(self, coro: Coroutine, timeout: float | None = None) -> Any:
        return run_on_loop(self.loop, coro, timeout)

    def submit(self, coro: Coroutine):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def get_many(self, keys: Sequence[str], *, latest: bool = True, timeout: float | None = None) -> dict:
        """``{key: ValueWithExpiration | None}`` for many keys in one DHT round (``latest``: ask every peer)."""
        if self.node is not None:
            return self.run(_get_many(None, self.node, keys=list(keys), latest=latest), timeout=timeout)
        return get_many(self.dht, keys, latest=latest)

    def shutdown(self) -> None:
        """Closes the P2P handle and the DHT, then stops and closes the loop (idempotent)."""
        if not self.loop.is_running():  # stopped (and closed) already
            return
        p2p = getattr(self, "p2p", None)
        try:
            self.run(self._close(p2p), timeout=10)
        except Exception:
            logger.debug("The DHT peer did not close cleanly", exc_info=True)
        try:
            if self.dht is not None:
                self._stop_dht_process()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():  # a stopped loop left open keeps its handles and fds for good
                self.loop.close()

    def _stop_dht_process(self) -> None:
        dht = self.dht
        if dht.is_alive():
            dht.shutdown()
        if dht.is_alive():
            dht.kill()
        if dht.pid is not None:  # started: reap it (a DHT that failed to start has exited but stays a zombie)
            dht.join(timeout=5)
        multiprocessing.active_children()

    async def _close(self, p2p) -> None:
        if self.node is not None:
            await self.node.shutdown()
        elif p2p is not None:
            await p2p.shutdown()
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current]  # DHT refresh timers and the like
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _get_many(dht, node, *, keys, latest: bool):
    # runs where the DHTNode lives (the DHT's child process, or this loop): one batched lookup for all keys
    expiration = float("inf") if latest else None
    return await node.get_many(keys, sufficient_expiration_time=expiration, num_workers=8)


def get_many(dht: hivemind.DHT, keys: Sequence[str], *, latest: bool = True) -> dict:
    """``{key: ValueWithExpiration | None}`` through a ``hivemind.DHT`` (e.g. a node's own), in one DHT round."""
    return dht.run_coroutine(partial(_get_many, keys=list(keys), latest=latest))
