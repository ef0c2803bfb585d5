"""The one reader of the swarm: who announces which blocks of a model (``read_swarm``) and which models are announced.

Nodes write their ``ServerInfo`` under one DHT key per block (``nectar.wire.announce``); the node's span choice and
push checks, the client's routing, ``nectar swarm``, the API's monitor, the ledger's audits and the test swarm all
read them through here. The DHT is either a ``ClientRuntime`` (``nectar.wire.dht``) or a ``hivemind.DHT``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from hivemind.p2p import PeerID

from nectar.wire.announce import (
    MAX_RECORD_AGE,
    MODELS_KEY,
    ServerInfo,
    ServerState,
    block_key,
    eth_proof_valid,
    record_fresh,
)
from nectar.wire.dht import ClientRuntime, get_many

logger = logging.getLogger(__name__)

MAX_BLOCKS = 10_000  # an announced model with more blocks than this is malformed


@dataclass(frozen=True)
class ModelSwarm:
    """One model's announcements: ``blocks[i]`` maps each peer announcing block ``i`` to its ``ServerInfo``."""

    model_id: str
    num_blocks: int
    blocks: dict[int, dict[PeerID, ServerInfo]]

    def servers(self) -> dict[PeerID, ServerInfo]:
        """Every announcing peer once, with its announcement."""
        return {peer: info for servers in self.blocks.values() for peer, info in servers.items()}

    def coverage(self, states: Collection[int] = (ServerState.ONLINE,)) -> list[int]:
        """Per block, how many peers in one of ``states`` announce it."""
        return [sum(info.state in states for info in self.blocks.get(i, {}).values()) for i in range(self.num_blocks)]

    def missing(self, states: Collection[int] = (ServerState.ONLINE,)) -> list[int]:
        """Blocks no peer in one of ``states`` announces."""
        return [i for i, count in enumerate(self.coverage(states)) if count == 0]


def parse_block_records(
    model_id: str,
    block_indices: Iterable[int],
    records: dict[Any, Any],
    *,
    states: Collection[int] | None = None,
    max_age: float = MAX_RECORD_AGE,
) -> dict[int, dict[PeerID, ServerInfo]]:
    """Turns DHT lookup results into {block: {peer: ServerInfo}}, dropping malformed entries, announcements made more
    than ``max_age`` s ago on this reader's clock (whatever expiry their signer wrote) and, with ``states``, those in
    other states. An ``eth_address`` whose ``eth_proof`` does not verify for the announcing peer is blanked: the
    record stays readable, but borrows no one's payments, stake or reputation."""
    now = time.time()
    result: dict[int, dict[PeerID, ServerInfo]] = {}
    for index in block_indices:
        entry = records.get(block_key(model_id, index))
        servers: dict[PeerID, ServerInfo] = {}
        if entry is not None and isinstance(entry.value, dict):
            for subkey, item in entry.value.items():
                try:
                    peer_id = PeerID(subkey)
                    info = ServerInfo.from_dict(item.value)
                except Exception as e:
                    logger.debug(f"Ignoring a malformed announcement for block {index}: {e}")
                    continue
                if not record_fresh(info, now, max_age):
                    continue
                if info.eth_address and not eth_proof_valid(peer_id, info.eth_address, info.eth_proof):
                    info.eth_address = ""
                if info.start <= index < info.end and (states is None or info.state in states):
                    servers[peer_id] = info
        result[index] = servers
    return result


def fetch_records(dht: ClientRuntime | Any, keys: Sequence[str], *, latest: bool = True) -> dict[Any, Any]:
    """``{key: ValueWithExpiration | None}`` for many keys in one DHT round."""
    if isinstance(dht, ClientRuntime):
        return dht.get_many(keys, latest=latest)
    return get_many(dht, keys, latest=latest)


def read_swarm(
    dht: ClientRuntime | Any,
    model_id: str,
    num_blocks: int,
    *,
    blocks: Iterable[int] | None = None,
    states: Collection[int] | None = None,
    max_age: float = MAX_RECORD_AGE,
) -> ModelSwarm:
    """The announcements of ``model_id`` (of ``blocks`` only, if given; of peers in ``states`` only, if given; made at
    most ``max_age`` s ago), addresses unproven by their peer blanked (``parse_block_records``)."""
    indices = list(range(num_blocks) if blocks is None else blocks)
    records = fetch_records(dht, [block_key(model_id, i) for i in indices])
    return ModelSwarm(
        model_id, num_blocks, parse_block_records(model_id, indices, records, states=states, max_age=max_age)
    )


def read_models(dht: ClientRuntime | Any) -> dict[str, int]:
    """Every announced model with its number of blocks (what nodes store under ``MODELS_KEY``)."""
    entry = fetch_records(dht, [MODELS_KEY]).get(MODELS_KEY)
    models: dict[str, int] = {}
    if entry is not None and isinstance(entry.value, dict):
        for item in entry.value.values():
            if isinstance(item.value, dict):
                for name, num_blocks in item.value.items():
                    if isinstance(name, str) and isinstance(num_blocks, int) and 0 < num_blocks < MAX_BLOCKS:
                        models[name] = num_blocks
    return models


def host_of(multiaddr) -> str | None:
    """The host part of a multiaddr (``/ip4/HOST/tcp/...``), or None."""
    parts = str(multiaddr).split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6", "dns", "dns4", "dns6") else None


def is_relayed(multiaddr) -> bool:
    """Whether a multiaddr goes through a circuit relay (``.../p2p/RELAY/p2p-circuit``): its host is the relay's."""
    return "/p2p-circuit" in str(multiaddr)


async def connected_hosts(p2p) -> dict[PeerID, set[str]]:
    """The hosts this P2P daemon reaches each connected peer at (the daemon authenticates peer ids). A connection
    through a relay names the relay's host, not the peer's: it counts for none (a relayed peer has no host here)."""
    return {
        peer.peer_id: {h for h in map(host_of, (a for a in peer.addrs if not is_relayed(a))) if h}
        for peer in await p2p.list_peers()
    }


async def lane_on_peer_host(p2p, peer_id: PeerID, address: str) -> bool:
    """Whether the direct lane ``address`` (HOST:PORT, from ``peer_id``'s record) is on a host this P2P daemon reaches
    ``peer_id`` at. A record is its signer's claim: dialling a lane only where this holds keeps a record from aiming
    readers at any host and port (push, ``nectar.node.push``; routing, ``nectar.client.routing``). The peer must be
    connected already (after a P2P call to it)."""
    from nectar.wire.direct import parse_address

    try:
        host, _ = parse_address(address)
    except ValueError:
        return False
    return host in (await connected_hosts(p2p)).get(peer_id, ())


__all__ = [
    "ModelSwarm",
    "connected_hosts",
    "fetch_records",
    "host_of",
    "is_relayed",
    "lane_on_peer_host",
    "parse_block_records",
    "read_models",
    "read_swarm",
]
