"""What backs a client's vouchers to a node on chain, for the node deciding how much credit to extend (issue 20)."""

from __future__ import annotations

import logging

from eth_utils import is_address, to_checksum_address
from fastapi import APIRouter, HTTPException

from nectar.ledger import crud
from nectar.ledger.deps import SessionDep, StateDep
from nectar.wire.ledger_api import BACKING, PREFIX, Backing

logger = logging.getLogger(__name__)
router = APIRouter(prefix=PREFIX, tags=["backing"])


def _address(value: str, what: str) -> str:
    if not is_address(value):
        raise HTTPException(422, f"{what} {value!r} is not an Ethereum address (0x + 40 hex digits)")
    return to_checksum_address(value)


@router.get(BACKING)
def backing(client: str, node: str, session: SessionDep, state: StateDep) -> dict:
    """The client's reserve for the node and what the chain paid on the client's channels to it (those the ledger
    holds vouchers for: a node posts every voucher it accepts). Read from the chain on each call; nodes cache it."""
    client, node = _address(client, "client"), _address(node, "node")
    try:
        chain = state.chain()
        reserve = chain.reserve_of(client, node)
        channels = {(v.partner, int(v.channel_id)) for v in crud.list_vouchers(session, node=node, client=client)}
        settled = sum(int(chain.paid(client, node, channel, partner)) for partner, channel in channels)
        unlock_delay = chain.unlock_delay()
    except FileNotFoundError as e:
        raise HTTPException(503, f"the ledger has no deployment to read the chain from: {e}") from None
    except Exception as e:  # the chain unreachable: the node falls back to its unbacked allowance
        logger.warning(f"Backing of {client} at {node}: chain read failed: {e}")
        raise HTTPException(503, f"the ledger could not read the chain ({type(e).__name__}); retry shortly") from None
    return Backing(
        client=client,
        node=node,
        settled=settled,
        reserve=reserve["amount"],
        pending_release=reserve["pendingRelease"],
        release_at=reserve["releaseAt"],
        unlock_delay=unlock_delay,
    ).to_json()
