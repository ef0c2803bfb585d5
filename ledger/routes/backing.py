"""What backs a client's vouchers to a node on chain, for the node deciding how much credit to extend (issue 20)."""

from __future__ import annotations

import logging

from eth_utils import is_address, to_checksum_address
from fastapi import APIRouter, Header, HTTPException

from nectar.ledger import crud
from nectar.ledger.deps import SessionDep, StateDep, is_admin
from nectar.ledger.stakes import ReadsBusy
from nectar.wire.ledger_api import BACKING, PREFIX, Backing

logger = logging.getLogger(__name__)
router = APIRouter(prefix=PREFIX, tags=["backing"])


def _address(value: str, what: str) -> str:
    if not is_address(value):
        raise HTTPException(422, f"{what} {value!r} is not an Ethereum address (0x + 40 hex digits)")
    return to_checksum_address(value)


def fresh_allowed(state, fresh: bool, authorization: str | None) -> bool:
    """``?fresh=true`` skips the ledger's short cache of chain reads; only its operator (the admin token) may ask,
    or anyone could make the ledger read the chain at will."""
    if fresh and not is_admin(state, authorization):
        raise HTTPException(
            401,
            "fresh=true is for the ledger's operator (send 'Authorization: Bearer <NECTAR_LEDGER_ADMIN_TOKEN>'); "
            f"without it the answer is at most {state.settings.chain_read_cache_s:g} s old",
        )
    return fresh


def busy(e: ReadsBusy) -> HTTPException:
    return HTTPException(503, str(e), headers={"Retry-After": "1"})


@router.get(BACKING)
def backing(
    client: str,
    node: str,
    session: SessionDep,
    state: StateDep,
    fresh: bool = False,
    authorization: str | None = Header(default=None),
) -> dict:
    """The client's reserve for the node and what the chain paid on the client's channels to it (those the ledger
    holds vouchers for: a node posts every voucher it accepts). Read from the chain at most once per pair and
    ``chain_read_cache_s`` (``ReadCache``: anyone may call this); nodes cache it longer."""
    client, node = _address(client, "client"), _address(node, "node")
    fresh = fresh_allowed(state, fresh, authorization)

    def read():
        chain = state.chain()
        reserve = chain.reserve_of(client, node)
        channels = {(v.partner, int(v.channel_id)) for v in crud.list_vouchers(session, node=node, client=client)}
        settled = sum(int(chain.paid(client, node, channel, partner)) for partner, channel in channels)
        return reserve, settled, chain.unlock_delay()

    try:
        reserve, settled, unlock_delay = state.reads.get(("backing", client, node), read, fresh=fresh)
    except ReadsBusy as e:
        raise busy(e) from None
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
