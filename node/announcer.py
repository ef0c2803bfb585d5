"""Publishes this node's ServerInfo for each hosted block, signed, on a fixed period (a background thread).

Each record carries ``eth_proof`` (the node's Ethereum key signing its peer id), without which readers ignore its
address, and a fresh ``timestamp``: readers drop records older than ``MAX_RECORD_AGE``, so the period is clamped to
half of it and the expiry to it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import partial

import hivemind
from hivemind.utils import get_dht_time

from nectar.wire.announce import MAX_RECORD_AGE, MODELS_KEY, ServerInfo, ServerState, block_key, sign_eth_proof

logger = logging.getLogger(__name__)

FINAL_ANNOUNCE_TIMEOUT = 5.0  # s a stopping node spends telling the swarm it is going offline


def record_lifetime(period: float) -> float:
    """Seconds an announcement made every ``period`` s stays in the DHT. Every record a node writes lives this long,
    OFFLINE ones too: the DHT keeps whichever of a peer's values expires last, so a shorter-lived OFFLINE record was
    dropped and a stopped node stayed ONLINE until its last record expired."""
    return min(max(3 * period, 15), MAX_RECORD_AGE)


def announce(
    dht: hivemind.DHT,
    model_id: str,
    num_model_blocks: int,
    info: ServerInfo,
    *,
    expiration: float,
    timeout: float = 60.0,
) -> bool:
    """Stores ``info`` under each hosted block; raises TimeoutError after ``timeout`` s (a DHT process that died never
    answers, and a node stopping must not wait for it forever)."""
    subkey = dht.peer_id.to_bytes()
    expires = get_dht_time() + expiration
    keys = [block_key(model_id, index) for index in range(info.start, info.end)] + [MODELS_KEY]
    values = [info.to_dict()] * (info.end - info.start) + [{model_id: num_model_blocks}]
    results = dht.run_coroutine(
        partial(_store_many, keys=keys, subkeys=[subkey] * len(keys), values=values, expiration_time=expires),
        return_future=True,
    ).result(timeout)
    ok = all(results.values()) if isinstance(results, dict) else bool(results)
    if not ok:
        logger.warning(f"Some announcements were not stored: {results}")
    return ok


async def _store_many(dht, node, *, keys, subkeys, values, expiration_time):
    # runs inside the DHT process: one batched store instead of a round trip per block
    return await node.store_many(
        keys=keys, subkeys=subkeys, values=values, expiration_time=expiration_time, num_workers=8
    )


class Announcer(threading.Thread):
    """Calls ``make_info()`` and announces it every ``period`` seconds until stopped."""

    def __init__(
        self,
        dht,
        model_id: str,
        num_model_blocks: int,
        make_info: Callable[[], ServerInfo],
        *,
        period: float,
        eth_key: str | None = None,
    ):
        """:param eth_key: the node's Ethereum key (hex); it signs the peer id into every record's ``eth_proof``"""
        super().__init__(name="nectar-announcer", daemon=True)
        self.dht, self.model_id, self.num_model_blocks = dht, model_id, num_model_blocks
        if period > MAX_RECORD_AGE / 2:
            logger.warning(
                f"--announce-period {period}s is longer than readers keep a record ({MAX_RECORD_AGE}s): announcing "
                f"every {MAX_RECORD_AGE / 2}s instead"
            )
            period = MAX_RECORD_AGE / 2
        self.period = period
        self.proof = proof = sign_eth_proof(eth_key, dht.peer_id) if eth_key else ""

        def signed_info() -> ServerInfo:
            info = make_info()
            info.eth_proof = proof
            return info

        self.make_info = signed_info
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                announce(
                    self.dht,
                    self.model_id,
                    self.num_model_blocks,
                    self.make_info(),
                    expiration=record_lifetime(self.period),
                )
            except Exception:
                logger.warning("Announcement failed (will retry)", exc_info=True)
            self.wake_event.wait(self.period)
            self.wake_event.clear()

    def announce_now(self) -> None:
        self.wake_event.set()

    def withdraw(self, info: ServerInfo, *, timeout: float = 60.0) -> bool:
        """Announces ``info``'s blocks OFFLINE (signed like every record, and as long-lived: ``record_lifetime``)."""
        info.state = int(ServerState.OFFLINE)
        info.eth_proof = self.proof
        expiration = record_lifetime(self.period)
        return announce(self.dht, self.model_id, self.num_model_blocks, info, expiration=expiration, timeout=timeout)

    def stop(self, final_info: ServerInfo | None = None) -> None:
        self.stop_event.set()
        self.wake_event.set()
        if final_info is not None:
            try:
                self.withdraw(final_info, timeout=FINAL_ANNOUNCE_TIMEOUT)
            except Exception:
                logger.debug("Could not announce OFFLINE", exc_info=True)
