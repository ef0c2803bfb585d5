"""``MarketService``: the swarm as the monitor shows it (DHT announcements + ledger reputation), the tokens-served and
credits-settled series, and a node's receipts, earnings, settlements and reputation (from the ledger)."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta

import anyio

from nectar.api import crud
from nectar.api.chain_watch import ChainWatcher
from nectar.api.core.config import WEI_PER_CREDIT
from nectar.api.errors import ApiError, not_found, unavailable
from nectar.api.schemas import (
    MarketStats,
    NodeEarnings,
    NodeReceipt,
    NodeReceipts,
    NodeReputation,
    NodeSettlement,
    NodeSettlements,
    StatPoint,
    SwarmModelView,
    SwarmNode,
    SwarmView,
)
from nectar.api.serving.base import ServingContext
from nectar.service.db import session_scope

logger = logging.getLogger(__name__)

VIEW_TTL = 2.0  # seconds a swarm view is reused (the monitor polls; the DHT need not be asked each time)
REPUTATION_TTL = 5.0


class MarketService:
    """:param context: the shared serving context
    :param ledger: a LedgerClient, or None when no ledger is configured
    :param watcher: the chain watcher (escrow earnings of nodes)"""

    def __init__(self, context: ServingContext, *, ledger, watcher: ChainWatcher):
        self.context, self.ledger, self.watcher = context, ledger, watcher
        self._view: tuple[float, SwarmView] | None = None
        self._reputation: tuple[float, dict[str, dict]] = (0.0, {})

    # ---- swarm -------------------------------------------------------------------------------------------------

    def _reputation_by_address(self) -> dict[str, dict]:
        stamp, cached = self._reputation
        if self.ledger is None or time.monotonic() - stamp < REPUTATION_TTL:
            return cached
        try:
            scores = {s["address"].lower(): s for s in self.ledger.reputation()}
        except Exception as e:  # the monitor keeps working without the ledger
            logger.info(f"Ledger reputation unavailable: {e}")
            scores = cached
        self._reputation = (time.monotonic(), scores)
        return scores

    def _build_view(self) -> SwarmView:
        from nectar.wire.announce import ServerState
        from nectar.wire.swarm import read_swarm

        reputation = self._reputation_by_address()
        models, nodes = [], []
        for name, served in self.context.swarm.models.items():
            num_blocks = served.model.num_blocks
            swarm = read_swarm(served.model.runtime, name, num_blocks)
            coverage = swarm.coverage()
            models.append(
                SwarmModelView(
                    name=name,
                    num_blocks=num_blocks,
                    coverage=coverage,
                    missing_blocks=[i for i, c in enumerate(coverage) if c == 0],
                )
            )
            seen = {str(peer_id): info for peer_id, info in swarm.servers().items()}
            for peer_id, info in sorted(seen.items(), key=lambda kv: (kv[1].start, kv[1].end, kv[1].public_name)):
                score = reputation.get((info.eth_address or "").lower())
                nodes.append(
                    SwarmNode(
                        peer_id=peer_id,
                        name=info.public_name or peer_id[-8:],
                        eth_address=info.eth_address,
                        model=name,
                        block_start=info.start,
                        block_end=info.end,
                        state=ServerState(info.state).name.lower(),
                        throughput=round(float(info.throughput), 3),
                        inference_rps=round(float(info.inference_rps), 3),
                        price_per_token=int(info.price_per_token),
                        cache_tokens_left=int(info.cache_tokens_left),
                        reputation=score["score"] if score else None,
                        new=score["new"] if score else None,
                    )
                )
        return SwarmView(
            models=models,
            nodes=nodes,
            gateway_address=self.context.swarm.wallet_address,
            ledger_url=self.context.settings.ledger_url,
            generated_at=datetime.now(UTC),
        )

    async def swarm_view(self) -> SwarmView:
        if self._view is not None and time.monotonic() - self._view[0] < VIEW_TTL:
            return self._view[1]
        view = await anyio.to_thread.run_sync(self._build_view)
        self._view = (time.monotonic(), view)
        return view

    # ---- series ------------------------------------------------------------------------------------------------

    async def stats(self, *, window_seconds: int, bucket_seconds: int) -> MarketStats:
        now = datetime.now(UTC)
        buckets = max(1, min(500, window_seconds // bucket_seconds))
        start_ts = (int(now.timestamp()) // bucket_seconds - buckets + 1) * bucket_seconds
        since = datetime.fromtimestamp(start_ts, UTC)

        def load():
            with session_scope(self.context.db) as session:
                return (
                    crud.usage_since(session, since=since),
                    [(b.settled_at, b.gross_wei) for b in crud.settled_since(session, since=since)],
                )

        usage, settled = await anyio.to_thread.run_sync(load)
        points = [
            StatPoint(t=since + timedelta(seconds=i * bucket_seconds), tokens=0, spent_micro=0, settled_credits=0.0)
            for i in range(buckets)
        ]

        def index(moment: datetime) -> int:
            if moment.tzinfo is None:  # SQLite returns naive datetimes (stored as UTC)
                moment = moment.replace(tzinfo=UTC)
            return min(buckets - 1, max(0, int((moment.timestamp() - start_ts) // bucket_seconds)))

        for moment, tokens, cost in usage:
            point = points[index(moment)]
            point.tokens += tokens
            point.spent_micro += cost
        for moment, gross in settled:
            points[index(moment)].settled_credits += gross / WEI_PER_CREDIT
        return MarketStats(
            bucket_seconds=bucket_seconds,
            points=points,
            total_tokens=sum(p.tokens for p in points),
            total_settled_credits=sum(p.settled_credits for p in points),
        )

    # ---- one node (from the ledger) ----------------------------------------------------------------------------

    async def _node(self, address: str) -> dict:
        from eth_utils import is_address, to_checksum_address

        if not is_address(address):
            raise ApiError(
                400,
                f"{address!r} is not an Ethereum address (0x + 40 hex digits)",
                param="address",
                code="invalid_address",
            )
        if self.ledger is None:
            raise unavailable(
                "No ledger is configured: start `nectar ledger` and pass --ledger-url (or "
                "NECTAR_API_LEDGER_URL) to see nodes' receipts and earnings",
                code="no_ledger",
            )
        from nectar.wire.ledger_api import LedgerError

        try:
            return await anyio.to_thread.run_sync(self.ledger.node, to_checksum_address(address))
        except LedgerError as e:
            if e.status == 404:
                raise not_found(f"The ledger has no record of node {address}", param="address") from None
            raise unavailable(f"The ledger answered {e.status}: {e.detail}", code="ledger_error") from None
        except Exception as e:
            raise unavailable(
                f"The ledger at {self.context.settings.ledger_url} does not answer ({e})", code="ledger_unavailable"
            ) from None

    async def receipts(self, address: str) -> NodeReceipts:
        data = await self._node(address)
        return NodeReceipts(
            address=data["address"],
            receipts_count=data["receipts_count"],
            recent=[NodeReceipt(**r) for r in data["recent_receipts"]],
        )

    async def earnings(self, address: str) -> NodeEarnings:
        data = await self._node(address)

        def withdrawable():
            try:
                return str(self.watcher.chain().node_balance(data["address"]))
            except Exception:  # no chain: the ledger's numbers still stand
                return None

        return NodeEarnings(
            address=data["address"],
            earned_wei=data["earned"],
            settled_wei=data["settled"],
            withdrawable_wei=await anyio.to_thread.run_sync(withdrawable),
        )

    async def settlements(self, address: str) -> NodeSettlements:
        data = await self._node(address)
        return NodeSettlements(address=data["address"], settlements=[NodeSettlement(**s) for s in data["settlements"]])

    async def reputation(self, address: str) -> NodeReputation:
        data = await self._node(address)
        return NodeReputation(**{**data["reputation"], "address": data["address"], "conflicts": data["conflicts"]})
