"""GET /v1/stakes (the registry table clients gate and weigh routes with) and /v1/stakes/{address} (a node's own
check at start)."""

from __future__ import annotations

import logging

from eth_utils import is_address, to_checksum_address
from fastapi import APIRouter, HTTPException

from nectar.ledger.deps import StateDep
from nectar.ledger.stakes import NoChain
from nectar.wire.ledger_api import PREFIX, STAKE, STAKES

logger = logging.getLogger(__name__)
router = APIRouter(prefix=PREFIX, tags=["stakes"])


def _read(what):
    try:
        return what()
    except NoChain as e:
        raise HTTPException(503, str(e)) from None
    except Exception as e:  # the RPC endpoint is down or the deployment is stale: say so, do not guess
        logger.warning(f"Reading stakes from the chain failed: {type(e).__name__}: {e}")
        raise HTTPException(503, f"the ledger could not read the NodeRegistry ({type(e).__name__}: {e})") from None


@router.get(STAKES)
def stakes(state: StateDep) -> dict:
    return _read(state.stakes.table).to_json()


@router.get(STAKE)
def stake(address: str, state: StateDep) -> dict:
    if not is_address(address):
        raise HTTPException(422, f"{address!r} is not an Ethereum address (0x + 40 hex digits)")
    return _read(lambda: state.stakes.node(to_checksum_address(address))).to_json()
