"""Liveness plus the public parameters nodes and clients need (domain, credit limit, fee)."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from sqlalchemy import text

from nectar.ledger.deps import SessionDep, StateDep
from nectar.ledger.stakes import NoChain
from nectar.wire.ledger_api import CONFIG, HEALTH, PREFIX

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
    }


def _min_stake(state) -> str | None:
    try:
        return str(state.stakes.min_stake())
    except NoChain:
        return None
    except Exception as e:  # chain down: the rest of the config is still worth answering
        logger.warning(f"Could not read minStake from the chain: {type(e).__name__}: {e}")
        return None
