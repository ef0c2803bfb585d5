"""Liveness plus the public parameters nodes and clients need (domain, credit limit, fee)."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, HTTPException
from sqlalchemy import text

from nectar.ledger.deps import SessionDep, StateDep
from nectar.ledger.stakes import NoChain
from nectar.wire.eip712 import address_of
from nectar.wire.ledger_api import CONFIG, HEALTH, PREFIX, VERIFIERS

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get(HEALTH)
def health(session: SessionDep) -> dict:
    session.execute(text("SELECT 1"))
    return {"status": "ok"}


@router.get(PREFIX + CONFIG)
def config(state: StateDep) -> dict:
    s = state.settings
    return {
        "domain": state.domains.get(),
        "credit_limit": str(s.credit_limit),
        "fee_bps": s.fee_bps,
        "epoch_seconds": s.epoch_seconds,
        "spot_check_fraction": s.spot_check_fraction,
        "min_stake": _min_stake(state),  # the registry's minimum (None: no deployment to read it from)
        "require_stake": s.require_stake,
        "audit_retention_s": s.audit_retention_s,  # nodes keep each step's audit record at least this long
    }


_VERIFIERS_TTL_S = 30.0
_verifiers_cache: dict = {}


@router.get(PREFIX + VERIFIERS)
def verifiers(state: StateDep) -> dict:
    """Who may audit nodes: Slashing's registered verifiers (nodes answer only their signed audit calls). Without a
    deployment, the ledger's own verifier key, if one is set."""
    cached = _verifiers_cache.get(id(state))
    if cached is not None and time.monotonic() - cached[0] < _VERIFIERS_TTL_S:
        return cached[1]
    try:
        answer = {"verifiers": state.stakes.chain().verifiers(), "source": "chain"}
    except NoChain:
        key = state.settings.verifier_key
        answer = {"verifiers": [address_of(key)] if key else [], "source": "settings"}
    except Exception as e:  # chain down: nodes keep the set they have
        logger.warning(f"Could not read the verifiers from the chain: {type(e).__name__}: {e}")
        raise HTTPException(503, "the ledger cannot read the verifier set from the chain now; retry later") from None
    _verifiers_cache[id(state)] = (time.monotonic(), answer)
    return answer


def _min_stake(state) -> str | None:
    try:
        return str(state.stakes.min_stake())
    except NoChain:
        return None
    except Exception as e:  # chain down: the rest of the config is still worth answering
        logger.warning(f"Could not read minStake from the chain: {type(e).__name__}: {e}")
        return None
