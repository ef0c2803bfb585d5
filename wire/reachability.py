"""Can other peers dial this node? A node asks peers it is already connected to (``nectar.reachability``).

The asker sends the multiaddrs it listens on; the helper opens a fresh TCP connection to each (with a timeout) and
answers whether a libp2p listener greeted it there. Every value the asker sends is a claim, so the helper:

- dials only hosts it already reaches the asker at (its P2P connection's remote host, relay circuits excluded): an
  asker can aim the check at no one but itself, so it is no port scanner for other hosts;
- dials at most ``MAX_DIALS`` addresses per request, ``MAX_CONCURRENT`` requests at once, each asker at most once per
  ``PER_PEER_INTERVAL`` and everyone together at most ``MAX_CHECKS_PER_MINUTE`` times a minute; the rest are refused.

A listener behind NAT is never dialled (its private address is not the host the helper sees), so NAT shows up as
"not reachable". Peers on the same LAN can reach each other's private addresses: the answer is what *that* peer
sees, which is why a node asks several.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import MSGPackSerializer

from nectar.wire.swarm import connected_hosts
from nectar.wire.transport import call_once, serve_stream

logger = logging.getLogger(__name__)

RPC_REACHABILITY = "nectar.reachability"
MAX_ADDRS = 16  # multiaddrs an asker may list
MAX_ADDR_LEN = 256  # characters per multiaddr
MAX_DIALS = 4  # TCP connections one check opens at most
DIAL_TIMEOUT = 3.0  # s for a connection and the listener's greeting
MAX_CONCURRENT = 2  # checks a peer runs at once
PER_PEER_INTERVAL = 30.0  # s between two checks for the same asker
MAX_CHECKS_PER_MINUTE = 20  # checks a peer runs a minute, all askers together
MAX_TRACKED_ASKERS = 4096
MAX_FRAME_BYTES = 16 * 1024  # a request or answer: a few addresses
GREETING = b"/multistream/1.0.0\n"  # what a libp2p TCP listener sends first (multistream-select)


def tcp_target(multiaddr: str, asker: PeerID) -> tuple[str, int] | None:
    """(host, port) of an ``/ip4|ip6/HOST/tcp/PORT[/p2p/ID]`` address, or None: anything else (DNS names, relay
    circuits, another peer's id, other transports) is not dialled."""
    if not isinstance(multiaddr, str) or len(multiaddr) > MAX_ADDR_LEN:
        return None
    parts = multiaddr.split("/")
    if len(parts) not in (5, 7) or parts[0] != "" or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    if len(parts) == 7 and (parts[5] != "p2p" or parts[6] != asker.to_base58()):
        return None
    try:
        port = int(parts[4])
    except ValueError:
        return None
    return (parts[2], port) if 0 < port < 65536 else None


async def greets(host: str, port: int, timeout: float = DIAL_TIMEOUT) -> bool:
    """Whether a fresh TCP connection to host:port is answered by a libp2p listener's greeting within ``timeout``."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        data = await asyncio.wait_for(reader.read(64), timeout)
        return GREETING in data
    except (TimeoutError, OSError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


class ReachabilityService:
    """The helper's side: answers ``nectar.reachability`` under the limits above."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self._running = asyncio.Semaphore(MAX_CONCURRENT)
        self._last: OrderedDict[PeerID, float] = OrderedDict()  # asker -> monotonic time of its last check
        self._recent: list[float] = []  # monotonic times of checks in the last minute
        self.dialled: list[tuple[str, int]] = []  # the last check's targets (tests read it)

    async def add_handler(self) -> None:
        # a stream RPC, as all of Nectar's: a hivemind unary handler hangs when added after a replica made unary calls
        await serve_stream(self.p2p, RPC_REACHABILITY, self._handle, max_frame_bytes=MAX_FRAME_BYTES)

    def _admit(self, asker: PeerID) -> str | None:
        now = time.monotonic()
        self._recent = [t for t in self._recent if now - t < 60.0]
        if now - self._last.get(asker, -PER_PEER_INTERVAL) < PER_PEER_INTERVAL:
            return f"checked less than {PER_PEER_INTERVAL:g}s ago"
        if len(self._recent) >= MAX_CHECKS_PER_MINUTE or self._running.locked():
            return "busy"
        self._last[asker] = now
        self._last.move_to_end(asker)
        while len(self._last) > MAX_TRACKED_ASKERS:
            self._last.popitem(last=False)
        self._recent.append(now)
        return None

    async def _handle(self, requests, context: P2PContext):
        async for request in requests:
            refused = self._admit(context.remote_id)
            if refused is None:
                async with self._running:
                    answer = await self._check(context.remote_id, request.metadata)
            else:
                answer = {"reachable": None, "error": refused}
            yield runtime_pb2.ExpertResponse(metadata=MSGPackSerializer.dumps(answer))
            return

    async def _check(self, asker: PeerID, metadata: bytes) -> dict:
        try:
            addrs = MSGPackSerializer.loads(metadata).get("addrs") if len(metadata) < 8192 else None
        except Exception:
            addrs = None
        if not isinstance(addrs, list) or len(addrs) > MAX_ADDRS:
            return {"reachable": None, "error": f"send {{'addrs': [at most {MAX_ADDRS} multiaddrs]}}"}
        hosts = (await connected_hosts(self.p2p)).get(asker, set())
        targets = []
        for addr in addrs:
            target = tcp_target(addr, asker)
            if target is not None and target[0] in hosts and target not in targets:
                targets.append(target)
        self.dialled = targets = targets[:MAX_DIALS]
        results = await asyncio.gather(*(greets(host, port) for host, port in targets))
        reachable = [f"{host}:{port}" for (host, port), ok in zip(targets, results) if ok]
        return {"reachable": bool(reachable), "at": reachable, "seen_from": sorted(hosts)[:4]}


@dataclass
class Reachability:
    """What the peers asked said: ``reachable`` True (one dialled us), False (all that answered failed), or None
    (nobody answered: unknown)."""

    reachable: bool | None
    at: list[str]  # HOST:PORT addresses a peer dialled
    asked: int
    answered: int
    seen_from: list[str]  # hosts the peers see this node's connections come from


async def ask_peers(
    p2p: P2P,
    addrs: Sequence[str],
    *,
    max_peers: int = 3,
    max_asked: int = 9,
    timeout: float = 10.0,
    prefer: Sequence[PeerID] = (),
    exclude: Sequence[PeerID] = (),
) -> Reachability:
    """Asks connected peers to dial ``addrs``, ``max_peers`` at a time (``prefer``red ones first, e.g. the bootstrap
    peers, then others at random), until one answers or ``max_asked`` were asked (older peers lack the protocol,
    busy ones refuse); see ``Reachability``."""
    connected = [info.peer_id for info in await p2p.list_peers() if info.peer_id not in exclude]
    random.shuffle(connected)
    first = [peer for peer in dict.fromkeys(prefer) if peer in connected]
    order = (first + [peer for peer in connected if peer not in first])[:max_asked]
    request = runtime_pb2.ExpertRequest(metadata=MSGPackSerializer.dumps({"addrs": list(addrs)[:MAX_ADDRS]}))

    async def ask(peer: PeerID) -> dict | None:
        try:
            response = await call_once(p2p, peer, RPC_REACHABILITY, request, timeout=timeout)
            answer = MSGPackSerializer.loads(response.metadata)
            return answer if isinstance(answer, dict) and isinstance(answer.get("reachable"), bool) else None
        except Exception as e:  # an older peer without the protocol, a busy one, a timeout
            logger.debug(f"Reachability check by {peer} failed: {type(e).__name__}: {e}")
            return None

    answers: list[tuple[PeerID, dict]] = []
    for begin in range(0, len(order), max_peers):
        batch = order[begin : begin + max_peers]
        results = await asyncio.gather(*(ask(peer) for peer in batch))
        answers += [(peer, a) for peer, a in zip(batch, results) if a is not None]
        if answers:
            break
    # an answer is its sender's claim: where the operator's own initial peers answered, only theirs count (a sybil
    # saying "reachable" must not keep a node behind NAT off the relays)
    trusted = [a for peer, a in answers if peer in first] or [a for _, a in answers]
    at = sorted({x for a in trusted for x in _strings(a.get("at"), MAX_DIALS)})
    seen = sorted({x for a in trusted for x in _strings(a.get("seen_from"), 4)})
    reachable = any(a["reachable"] for a in trusted) if trusted else None
    return Reachability(reachable, at, len(order), len(answers), seen)


def _strings(value, limit: int) -> list[str]:
    """Up to ``limit`` short strings of a peer's list (anything else in it is dropped)."""
    if not isinstance(value, list):
        return []
    return [x for x in value[:limit] if isinstance(x, str) and len(x) <= MAX_ADDR_LEN]


__all__ = ["RPC_REACHABILITY", "Reachability", "ReachabilityService", "ask_peers", "greets", "tcp_target"]
