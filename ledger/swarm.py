"""The ledger's own view of the swarm: which node (Ethereum address) is which peer, who serves which blocks, and RPCs.

It reads the swarm through a ``ClientRuntime`` whose DHT runs inside this process (``hivemind.DHT`` would start a
child process, which Celery's prefork workers cannot do: their pool processes are daemonic). Used by the spot
checks (``swarm_audit.py``) to fetch a step's inputs from the node that served it and to re-run the step elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from nectar.wire.announce import ServerInfo, ServerState
from nectar.wire.dht import ClientRuntime
from nectar.wire.protocol import NodeRPCError
from nectar.wire.receipts import model_id_hash
from nectar.wire.swarm import read_models, read_swarm
from nectar.wire.transport import RESPONSE_FRAME_LIMIT, AnswerTooLarge, call_once

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeEntry:
    """One node as announced: its peer, the model it serves and its span."""

    peer_id: PeerID
    model: str
    info: ServerInfo


class SwarmView:
    """A client-mode DHT peer owned by the ledger; thread-safe, blocking methods.

    :param initial_peers: multiaddrs of swarm peers (as for ``nectar node --initial-peers``)
    :param refresh_period: seconds a fetched view of the announcements is reused
    :param timeout: seconds for DHT lookups and for starting up
    """

    def __init__(self, initial_peers: Sequence[str], *, refresh_period: float = 10.0, timeout: float = 60.0):
        if not initial_peers:
            raise ValueError(
                "the ledger needs swarm peers for audits: set NECTAR_LEDGER_SWARM_INITIAL_PEERS (or "
                "NECTAR_INITIAL_PEERS) to a multiaddr printed by `nectar dht` or `nectar node`"
            )
        self.initial_peers, self.refresh_period, self.timeout = list(initial_peers), refresh_period, timeout
        self._lock = threading.Lock()
        self._nodes: list[NodeEntry] = []
        self._models: dict[bytes, tuple[str, int]] = {}
        self._fetched_at = float("-inf")
        # in-process: Celery's prefork pool processes are daemonic and may not start a DHT child process
        self._runtime = ClientRuntime(
            self.initial_peers, in_process=True, start_timeout=timeout, thread_name="ledger-swarm"
        )
        logger.info(f"Ledger joined the swarm as {self._runtime.peer_id} via {self.initial_peers[0]}")

    def run(self, coro, timeout: float | None = None):
        return self._runtime.run(coro, timeout)

    # ---- announcements ----------------------------------------------------------------------------------------

    def refresh(self, *, force: bool = False) -> None:
        with self._lock:
            if not force and time.monotonic() - self._fetched_at < self.refresh_period:
                return
            models = {model_id_hash(name): (name, n) for name, n in read_models(self._runtime).items()}
            nodes: dict[tuple[PeerID, str], NodeEntry] = {}
            for name, num_blocks in models.values():
                for peer_id, info in read_swarm(self._runtime, name, num_blocks).servers().items():
                    nodes[(peer_id, name)] = NodeEntry(peer_id, name, info)
            self._models, self._nodes, self._fetched_at = models, list(nodes.values()), time.monotonic()

    def model_name(self, model_hash: bytes) -> str | None:
        """The announced model name whose keccak256 is ``model_hash`` (what receipts carry)."""
        self.refresh()
        if model_hash not in self._models:
            self.refresh(force=True)
        found = self._models.get(bytes(model_hash))
        return found[0] if found else None

    def knows_model(self, model_hash: bytes) -> bool | None:
        """Whether some node announces the model; None when this view sees no model at all (the ledger's own
        connection to the swarm is down: it cannot tell)."""
        if self.model_name(model_hash) is not None:
            return True
        return False if self._models else None

    def nodes(self) -> list[NodeEntry]:
        self.refresh()
        return list(self._nodes)

    def peer_of(self, eth_address: str, model: str) -> NodeEntry | None:
        """The peer announcing ``eth_address`` as its receipt signer for ``model`` (refreshes once on a miss)."""
        for force in (False, True):
            if force:
                self.refresh(force=True)
            for entry in self.nodes():
                if entry.model == model and entry.info.eth_address.lower() == eth_address.lower():
                    return entry
        return None

    def serving(self, model: str, start: int, end: int) -> list[NodeEntry]:
        """Online nodes whose span covers blocks [start, end) of ``model``."""
        return [
            e
            for e in self.nodes()
            if e.model == model and e.info.state == ServerState.ONLINE and e.info.start <= start and end <= e.info.end
        ]

    # ---- RPC --------------------------------------------------------------------------------------------------

    def call(
        self,
        peer_id: PeerID,
        name: str,
        request: runtime_pb2.ExpertRequest,
        *,
        timeout: float,
        attempts: int = 3,
        max_frame_bytes: int = RESPONSE_FRAME_LIMIT,
    ) -> runtime_pb2.ExpertResponse:
        """One RPC; a transport failure (the first stream to a peer sometimes closes unanswered) is retried, an
        error the node reported (``ErrorCode``-prefixed) or an answer over ``max_frame_bytes`` (``AnswerTooLarge``,
        not read) is raised at once."""
        for attempt in range(attempts):
            try:
                return self.run(
                    call_once(
                        self._runtime.p2p, peer_id, name, request, timeout=timeout, max_frame_bytes=max_frame_bytes
                    ),
                    timeout=timeout + 5,
                )
            except Exception as e:
                if isinstance(e, AnswerTooLarge) or NodeRPCError.code_of(e) is not None or attempt == attempts - 1:
                    raise
                logger.debug(f"{name} to {peer_id} failed ({type(e).__name__}: {e}); retrying")
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def shutdown(self) -> None:
        self._runtime.shutdown()
