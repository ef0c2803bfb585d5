"""GET /v1/stakes (the registry table clients gate and weigh routes with) and /v1/stakes/{address} (a node's own
check at start)."""

from __future__ import annotations

import logging

from eth_utils import is_address, to_checksum_address
from fastapi import APIRouter, Header, HTTPException

from nectar.ledger.deps import StateDep
from nectar.ledger.routes.backing import busy, fresh_allowed
from nectar.ledger.stakes import NoChain, ReadsBusy
from nectar.wire.ledger_api import PREFIX, STAKE, STAKES

logger = logging.getLogger(__name__)
router = APIRouter(prefix=PREFIX, tags=["stakes"])


def _read(what):
    try:
        return what()
    except ReadsBusy as e:
        raise busy(e) from None
    except NoChain as e:
        raise HTTPException(503, str(e)) from None
    except Exception as e:  # the RPC endpoint is down or the deployment is stale: say so, do not guess
        logger.warning(f"Reading stakes from the chain failed: {type(e).__name__}: {e}")
        raise HTTPException(503, f"the ledger could not read the NodeRegistry ({type(e).__name__}: {e})") from None


@router.get(STAKES)
def stakes(state: StateDep) -> dict:
    return _read(state.stakes.table).to_json()


@router.get(STAKE)
def stake(address: str, state: StateDep, fresh: bool = False, authorization: str | None = Header(default=None)) -> dict:
    """One node's registration, read from the chain at most once per address and ``chain_read_cache_s``."""
    if not is_address(address):
        raise HTTPException(422, f"{address!r} is not an Ethereum address (0x + 40 hex digits)")
    address = to_checksum_address(address)
    fresh = fresh_allowed(state, fresh, authorization)
    return _read(lambda: state.reads.get(("stake", address), lambda: state.stakes.node(address), fresh=fresh)).to_json()
