"""Who may audit this node: only registered verifiers, with signed, fresh, never replayed calls.

An audit answer carries a session's inputs (block 0's are token embeddings: the user's prompt), so the node answers
an ``AuditCall`` only when it is signed (``AuditCall.signed``) for this node's address and peer id, dated within
``AUDIT_MAX_SKEW_S`` of the node's clock, not seen before, and its signer is a verifier. The verifier set comes from
the ledger (``GET /v1/verifiers``: Slashing's registered verifiers), cached, plus any addresses the operator names
(``--audit-verifiers``). Anything else gets ``ErrorCode.FORBIDDEN`` and nothing more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from nectar.wire.eip712 import InvalidSignature
from nectar.wire.messages import AUDIT_MAX_SKEW_S, AuditCall
from nectar.wire.protocol import ErrorCode, NodeRPCError

logger = logging.getLogger(__name__)


def _forbidden(message: str) -> NodeRPCError:
    return NodeRPCError(ErrorCode.FORBIDDEN, message)


class AuditGate:
    """Checks audit calls for one node.

    :param node_address: the node's receipt-signing address (calls are signed for it)
    :param fixed: verifier addresses the operator allows besides the ledger's
    :param fetch: blocking call returning the ledger's verifier list (None: no ledger)
    :param ttl: seconds the fetched list is reused
    :param miss_refresh: an unknown signer re-fetches the list at most this often (a new verifier is heard of soon,
        while strangers cannot make the node hammer its ledger)
    """

    def __init__(
        self,
        *,
        node_address: str,
        fixed: Iterable[str] = (),
        fetch: Callable[[], list[str]] | None = None,
        ttl: float = 60.0,
        miss_refresh: float = 5.0,
        max_skew: float = AUDIT_MAX_SKEW_S,
        clock: Callable[[], float] = time.time,
    ):
        self.node_address, self.fetch, self.ttl, self.miss_refresh = node_address, fetch, ttl, miss_refresh
        self.max_skew, self.clock = max_skew, clock
        self.fixed = {a.lower() for a in fixed if a}
        self._fetched: set[str] = set()
        self._fetched_at = float("-inf")
        self._lock = asyncio.Lock()
        self._seen: dict[bytes, float] = {}  # nonce -> when it may be forgotten (stale by then anyway)
        self.refused = 0

    async def verifiers(self, *, force: bool = False) -> set[str]:
        if self.fetch is not None:
            async with self._lock:
                age = time.monotonic() - self._fetched_at
                if age > self.ttl or (force and age > self.miss_refresh):
                    self._fetched_at = time.monotonic()
                    try:
                        self._fetched = {a.lower() for a in await asyncio.to_thread(self.fetch)}
                    except Exception as e:  # keep the last known set: a ledger outage must not open or close audits
                        logger.warning(f"Could not fetch the verifier set from the ledger: {type(e).__name__}: {e}")
        return self.fixed | self._fetched

    async def check(self, call: AuditCall, peer_id: str) -> str:
        """The verifier that signed ``call``; raises ``NodeRPCError(FORBIDDEN)`` for any call not to answer."""
        try:
            return await self._check(call, peer_id)
        except NodeRPCError:
            self.refused += 1
            raise

    async def _check(self, call: AuditCall, peer_id: str) -> str:
        if not call.signature:
            raise _forbidden("audits are answered to registered verifiers only: sign the call (AuditCall.signed)")
        now = self.clock()
        if abs(now - call.timestamp) > self.max_skew:
            raise _forbidden(
                f"stale audit call: dated {call.timestamp}, this node's clock says {int(now)} (more than "
                f"{self.max_skew:.0f}s apart); sign a fresh call and check your clock"
            )
        if len(call.nonce) < 8:
            raise _forbidden("an audit call needs a random nonce of 8 to 32 bytes")
        try:
            signer = call.signer(node=self.node_address, peer_id=peer_id)
        except InvalidSignature as e:
            raise _forbidden(f"bad audit signature ({e}); sign the call for this node's address and peer id")
        if signer.lower() not in await self.verifiers() and signer.lower() not in await self.verifiers(force=True):
            raise _forbidden(
                f"{signer} is not a registered verifier (or signed this call for another node); only the verifiers "
                "the ledger lists at /v1/verifiers may audit"
            )
        for nonce in [n for n, forget_at in self._seen.items() if forget_at < now]:
            del self._seen[nonce]
        if call.nonce in self._seen:
            raise _forbidden("replayed audit call (its nonce was used already); sign a fresh call")
        self._seen[call.nonce] = call.timestamp + self.max_skew + 1
        return signer


__all__ = ["AuditGate"]
