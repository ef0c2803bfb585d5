"""Opening RPC streams to a node: its direct TCP lane when it announces one and it answers, else P2P."""
from __future__ import annotations

import logging
from typing import AsyncIterator

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from nectar.wire.announce import ServerInfo
from nectar.wire.direct import call_stream_direct
from nectar.wire.transport import call_stream, first_response

logger = logging.getLogger(__name__)


async def open_stream(p2p: P2P, peer_id: PeerID, info: ServerInfo | None, name: str,
                      requests: AsyncIterator[runtime_pb2.ExpertRequest], *, direct: bool = True
                      ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    if direct and info is not None and info.direct_address:
        try:
            return await call_stream_direct(info.direct_address, name, requests)
        except (OSError, ValueError) as e:  # not reachable from here (another host, a firewall): P2P still is
            logger.debug(f"Direct lane {info.direct_address} of {peer_id} unreachable ({e}); using P2P")
    return await call_stream(p2p, peer_id, name, requests)


async def call_unary(p2p: P2P, peer_id: PeerID, info: ServerInfo | None, name: str,
                     request: runtime_pb2.ExpertRequest, *, direct: bool = True,
                     timeout: float | None = None) -> runtime_pb2.ExpertResponse:
    """One request, one response (forward, backward, info), on the fastest lane."""
    return await first_response(lambda requests: open_stream(p2p, peer_id, info, name, requests, direct=direct),
                                request, peer=peer_id, name=name, timeout=timeout)
