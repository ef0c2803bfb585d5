"""Failed spot checks on chain: attest each failure (evidence = the receipt's leaf), then, once the case's dispute
window has passed, finalize the slash. Every step is re-read from the chain first, so retries are harmless.

Called by ``SpotChecker`` (the attestation right after a verdict) and by the beat task ``finalize_slashes``
(attestations that could not be sent, and cases whose window has ended).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import Engine

from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.ledger.models import SpotCheck
from nectar.service.db import session_scope

logger = logging.getLogger(__name__)

UNATTESTED, ATTESTED, SLASHED, CLOSED = "unattested", "attested", "slashed", "closed"


def _error_name(error: Exception) -> str:
    return getattr(error, "error_name", None) or ""


def _hex(tx_hash) -> str | None:
    if tx_hash is None or isinstance(tx_hash, str):
        return tx_hash
    return "0x" + bytes(tx_hash).hex()


def attest(chain, settings: Settings, *, node: str, leaf: bytes) -> tuple[str | None, str]:
    """Attest one failed check as the verifier account: (tx hash, slash status)."""
    try:
        result = chain.attest_spot_check_failure(settings.key_for("verifier"), node, leaf)
    except Exception as e:
        name = _error_name(e)
        if name == "AlreadyAttested":  # an earlier run sent it and crashed before recording
            return None, ATTESTED
        if name == "CaseClosed":
            return None, CLOSED
        logger.error(
            f"Could not attest the spot-check failure of {node} on chain ({type(e).__name__}: {e}); "
            f"the worker retries on its next slash round"
        )
        return None, UNATTESTED
    logger.warning(f"Attested a failed spot check of {node} on chain (tx {_hex(result.tx_hash)})")
    return _hex(result.tx_hash), ATTESTED


def _slashed_on_chain(chain, node: str, leaf: bytes) -> bool:
    case_id = chain.spot_check_case_id(node, leaf)
    return bool(chain.events("Slashing", "SpotCheckSlashed", filters={"caseId": case_id}))


@dataclass
class SlashRound:
    attested: int = 0
    slashed: int = 0
    waiting: int = 0
    closed: int = 0


def finalize_spot_check_slashes(settings: Settings, engine: Engine, chain) -> SlashRound:
    """Re-send missing attestations; finalize every attested case whose dispute window has passed."""
    report = SlashRound()
    with session_scope(engine) as session:
        todo = [(c.id, c.node, c.slash_status, leaf) for c, leaf in crud.spot_checks_to_slash(session)]
    for check_id, node, status, leaf in todo:
        tx_hash = None
        if status == UNATTESTED:
            tx_hash, status = attest(chain, settings, node=node, leaf=leaf)
            report.attested += status == ATTESTED
        slash_tx = None
        if status == ATTESTED:
            try:
                slash_tx = _hex(chain.finalize_slash(settings.key_for("ledger"), node, leaf).tx_hash)
                status = SLASHED
                report.slashed += 1
                logger.warning(f"Slashed {node} on chain for a failed spot check (tx {slash_tx})")
            except Exception as e:
                name = _error_name(e)
                if name in ("DisputeWindowOpen", "CaseNotReady"):  # not yet: k attestations or the window missing
                    report.waiting += 1
                elif name == "CaseClosed":  # finalized by someone else (anyone may) or dismissed by the arbiter
                    status = SLASHED if _slashed_on_chain(chain, node, leaf) else CLOSED
                    report.closed += status == CLOSED
                    report.slashed += status == SLASHED
                else:
                    logger.error(f"Could not finalize the slash of {node} ({type(e).__name__}: {e}); retrying later")
        with session_scope(engine) as session:
            check = session.get(SpotCheck, check_id)
            check.slash_status = status
            check.attest_tx_hash = tx_hash or check.attest_tx_hash
            check.slash_tx_hash = slash_tx or check.slash_tx_hash
            if status == SLASHED:
                crud.record_slash(session, node=node)
    if todo:
        logger.info(f"Slash round: {report}")
    return report


__all__ = ["attest", "finalize_spot_check_slashes", "SlashRound", "UNATTESTED", "ATTESTED", "SLASHED", "CLOSED"]
