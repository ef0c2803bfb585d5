"""Server-to-server push of hidden states: a hop sends its step's output straight to the next hop (issue 6).

Without push, every step goes client -> A -> client -> B -> client. With push, the client sends A its step (naming
B's direct address and B's push token) and B a step whose input "arrives by push"; A pushes its output to B's
``rpc_push`` as soon as it is computed, then signs its receipt and answers the client as usual, so the token's
critical path is client -> A -> B -> client (pushing before the receipt measured ~0.5 ms/token faster on "tiny"
than answering first). If A's answer then never reaches the client, B may have computed a step the client cannot
check: the client retries it under a new step number, so no node signs two receipts for one (session, step).

``PushInbox`` (receiving side) holds the sessions open on this node that accept pushes, each behind a random token
only the client and the previous hop know. A node pushes only to the direct lane of an announced node of the route
(``lane_owner``): an online node serving the next block, whose verified record names that lane, and whose P2P
connection (authenticated by its peer id) comes from the lane's host. A record is the signer's claim, so the host
check is what keeps a sybil record from aiming honest nodes at any host and port; a lane on another host than the
node's P2P address (a NAT, a separate interface) gets no pushes, and the client relays instead.
``PushLink`` (sending side) is one session's stream to the next hop's push RPC over the direct TCP lane.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import suppress
from dataclasses import dataclass, field

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from nectar.wire.announce import ServerInfo, ServerState
from nectar.wire.direct import parse_address, send_hello
from nectar.wire.protocol import RPC_PUSH, ErrorCode, NodeRPCError, peer_text
from nectar.wire.swarm import connected_hosts
from nectar.wire.transport import receive_frame, send_message

logger = logging.getLogger(__name__)

ACK_FRAME_LIMIT = 64 * 1024  # bytes an ack (or error) from the next hop may take: acks carry no tensors
MAX_EARLY_PUSHES = 8  # pushes a session holds for steps it has not asked for yet (bounds a flood)
CONNECT_TIMEOUT = 2.0  # s to reach the next hop's direct lane; a step's answer waits for it once per session


async def lane_owner(p2p: P2P, announcements: dict[PeerID, ServerInfo], address: str) -> PeerID | None:
    """The announced node whose direct lane ``address`` is, if this node may push there: it is online or joining in
    ``announcements`` (verified records of the next block) and this node's P2P daemon, which authenticates peer ids,
    reaches it at the lane's host. A peer not connected yet is dialled once over P2P (an info call). None: refuse."""
    try:
        host, _ = parse_address(address)
    except ValueError:
        return None
    owners = [
        peer
        for peer, info in announcements.items()
        if info.direct_address == address and info.state != ServerState.OFFLINE and info.eth_address
    ]
    if not owners:
        return None
    hosts = await connected_hosts(p2p)
    for peer in owners:
        if peer not in hosts:
            from nectar.wire.stubs import call_info  # dials the peer by its id: its address comes from P2P

            with suppress(Exception):
                await call_info(p2p, peer, None, direct=False, timeout=CONNECT_TIMEOUT)
            hosts = await connected_hosts(p2p)
        if host in hosts.get(peer, ()):
            return peer
    return None


@dataclass
class PushSlot:
    """One inference session's mailbox: pushed hidden states by step, until the session's step takes them."""

    token: bytes
    batch_size: int
    arrived: dict[int, asyncio.Future] = field(default_factory=dict)

    def future(self, step: int) -> asyncio.Future:
        if step not in self.arrived:
            self.arrived[step] = asyncio.get_running_loop().create_future()
        return self.arrived[step]

    def forget_until(self, step: int) -> None:
        """Drops pushes of steps before ``step`` (the client fell back to relaying them)."""
        for old in [s for s in self.arrived if s < step]:
            del self.arrived[old]


class PushInbox:
    """Sessions on this node that accept pushes, keyed by session id; used by ``NodeHandler`` on its loop."""

    def __init__(self):
        self._sessions: dict[bytes, list[PushSlot]] = {}
        self.received = 0  # pushes delivered to a session (exposed in the info RPC)

    def open(self, session_id: bytes, token: bytes, batch_size: int) -> PushSlot:
        slot = PushSlot(token, batch_size)
        self._sessions.setdefault(session_id, []).append(slot)
        return slot

    def close(self, session_id: bytes, slot: PushSlot) -> None:
        slots = self._sessions.get(session_id, [])
        if slot in slots:
            slots.remove(slot)
        if not slots:
            self._sessions.pop(session_id, None)
        for future in slot.arrived.values():
            future.cancel()

    def find(self, session_id: bytes, token: bytes) -> PushSlot:
        slots = self._sessions.get(session_id)
        if not slots:
            raise NodeRPCError(
                ErrorCode.UNKNOWN_SESSION,
                "no open inference session here accepts pushes for this session_id (closed, expired or never opened)",
            )
        for slot in slots:
            if hmac.compare_digest(slot.token, token):
                return slot
        raise NodeRPCError(
            ErrorCode.BAD_REQUEST, "push token does not match the session's; only the hop the client named may push"
        )

    def deliver(self, slot: PushSlot, step: int, hidden: torch.Tensor) -> None:
        future = slot.arrived.get(step)
        if future is None and len(slot.arrived) >= MAX_EARLY_PUSHES:
            raise NodeRPCError(ErrorCode.TOO_LARGE, f"{MAX_EARLY_PUSHES} pushes already wait for their steps")
        future = slot.future(step)
        if future.done():
            raise NodeRPCError(ErrorCode.BAD_REQUEST, f"step {step} was already pushed")
        future.set_result(hidden)
        self.received += 1


class PushLink:
    """A stream from this node to the next hop's ``rpc_push`` on its direct lane, opened on the first push of a
    session and reused for its later steps; the next hop's acks are read (and errors logged) in the background."""

    def __init__(self, address: str):
        self.address = address
        self.writer: asyncio.StreamWriter | None = None
        self.error: str | None = None  # the last error the next hop reported, if any
        self.unreachable: str | None = None  # set when connecting failed: not retried, the client relays
        self._reading: asyncio.Task | None = None

    @classmethod
    def reuse(cls, link: PushLink | None, address: str) -> PushLink:
        """``link`` if it goes to ``address``, else a new link there (the first push, or a failover moved the next
        hop); a session keeps one link, so a client cannot make a node hold many connections."""
        if link is not None and link.address == address:
            return link
        if link is not None:
            link.close()
        return cls(address)

    async def send(self, request: runtime_pb2.ExpertRequest) -> None:
        if self.unreachable is not None:
            raise ConnectionError(f"{self.address} was unreachable: {self.unreachable}")
        if self.writer is None or self.writer.is_closing():
            try:
                await self._connect()
            except (TimeoutError, OSError) as e:
                self.unreachable = f"{type(e).__name__}: {e}"
                raise
        await send_message(request, self.writer)

    async def _connect(self) -> None:
        host, port = parse_address(self.address)
        reader, self.writer = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
        await send_hello(RPC_PUSH, self.writer)
        self._reading = asyncio.create_task(self._read_acks(reader, self.writer))

    async def _read_acks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                _, error = await receive_frame(runtime_pb2.ExpertResponse, reader, ACK_FRAME_LIMIT)
                if error is not None:
                    self.error = peer_text(error.message)  # the next node's text
                    logger.warning(f"Push to {self.address} refused: {self.error}")
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except (ValueError, TypeError) as e:  # an oversize or malformed frame: stop reading this lane
            self.error = f"malformed ack: {e}"
            logger.warning(f"Push to {self.address}: {self.error}")
        finally:
            writer.close()

    def close(self) -> None:
        if self.writer is not None:
            with suppress(Exception):
                self.writer.close()
        if self._reading is not None:
            self._reading.cancel()
