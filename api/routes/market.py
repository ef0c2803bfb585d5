"""The market: swarm view (public), series for the chart, and one node's receipts, earnings, settlements and
reputation. The last two are the operator's: they answer to the admin token or to a request signed by a node's own
Ethereum key (``nectar.wire.request_auth``), a node seeing only its own records."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Query

from nectar.api.deps import MarketServiceDep, MemberOrAdminDep, NodeOrAdminDep, StateDep
from nectar.api.routes.responses import errors
from nectar.api.schemas import (
    GatewayInfo,
    MarketStats,
    NodeEarnings,
    NodeReceipts,
    NodeReputation,
    NodeSettlements,
    SwarmView,
)

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["market"])


@router.get("/market/swarm", response_model=SwarmView, summary="Swarm view")
async def swarm(service: MarketServiceDep) -> SwarmView:
    """Which nodes host which blocks of the served models, their state, throughput, price and reputation."""
    return await service.swarm_view()


@router.get("/market/gateway", response_model=GatewayInfo, summary="Gateway id")
async def gateway(state: StateDep) -> GatewayInfo:
    """This deployment's id, which a node signs into its operator requests (public: it is no secret, only a name)."""
    return GatewayInfo(gateway_id=state.gateway_id)


@router.get("/market/stats", response_model=MarketStats, summary="Market series", responses=errors(401, 403, 422))
async def stats(
    _: MemberOrAdminDep,
    service: MarketServiceDep,
    window: int = Query(default=3600, ge=60, le=7 * 86400),
    bucket: int = Query(default=60, ge=1, le=86400),
) -> MarketStats:
    """Tokens served to API users and credits settled on chain, per ``bucket`` seconds over ``window`` seconds.
    The admin's, or a swarm node's (signed request)."""
    return await service.stats(window_seconds=window, bucket_seconds=bucket)


@router.get(
    "/nodes/{address}/receipts",
    response_model=NodeReceipts,
    summary="A node's receipts",
    responses=errors(401, 403, 404, 422, 503),
)
async def node_receipts(address: str, _: NodeOrAdminDep, service: MarketServiceDep) -> NodeReceipts:
    """Receipts the node signed, as the ledger stored them. The admin's, or the node's own (signed request)."""
    return await service.receipts(address)


@router.get(
    "/nodes/{address}/earnings",
    response_model=NodeEarnings,
    summary="A node's earnings",
    responses=errors(401, 403, 404, 422, 503),
)
async def node_earnings(address: str, _: NodeOrAdminDep, service: MarketServiceDep) -> NodeEarnings:
    """Receipted earnings, amounts settled on chain, and what it can withdraw from the escrow. The admin's, or the
    node's own (signed request)."""
    return await service.earnings(address)


@router.get(
    "/nodes/{address}/settlements",
    response_model=NodeSettlements,
    summary="A node's settlements",
    responses=errors(401, 403, 404, 422, 503),
)
async def node_settlements(address: str, _: NodeOrAdminDep, service: MarketServiceDep) -> NodeSettlements:
    """Vouchers to the node included in settlement batches. The admin's, or the node's own (signed request)."""
    return await service.settlements(address)


@router.get(
    "/nodes/{address}/reputation",
    response_model=NodeReputation,
    summary="A node's reputation",
    responses=errors(401, 403, 404, 422, 503),
)
async def node_reputation(address: str, _: NodeOrAdminDep, service: MarketServiceDep) -> NodeReputation:
    """The ledger's score and its components. The admin's, or the node's own (signed request)."""
    return await service.reputation(address)
