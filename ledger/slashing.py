"""Failed spot checks on chain: attest one failure per node and epoch, then, once the case's dispute window has
passed, finalize the slash. Every step is re-read from the chain first, so retries are harmless.

A case names the failed receipt (signed by its node), the Merkle proof that it is in the epoch's committed root, and
the hash of the re-execution record (``evidence_record``: what the verifiers found, rebuilt from the database). The
chain takes one case per node and epoch: the first failure of a node in an epoch is attested, the node's other
failures of that epoch stay on record as ``covered``. The root must be final (past Settlement's challenge period)
before a case can cite it: until then the attestation waits (``unattested``) and the beat task retries.

Called by ``SpotChecker`` (the attestation right after a verdict) and by the beat task ``finalize_slashes``
(attestations that could not be sent yet, and cases whose window has ended).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from sqlalchemy import Engine

from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.ledger.models import Receipt, SpotCheck
from nectar.service.db import session_scope
from nectar.wire.merkle import merkle_proof
from nectar.wire.receipts import keccak256

logger = logging.getLogger(__name__)

# slash_status of a failed check: unattested (to send, or waiting for the root to be final) / attested (dispute window
# running) / slashed / closed (dismissed by the arbiter) / covered (another failure of the node in this epoch is the
# case) / capped (the epoch's case cap was reached) / expired (the root got too old before the case could be opened)
UNATTESTED, ATTESTED, SLASHED, CLOSED = "unattested", "attested", "slashed", "closed"
COVERED, CAPPED, EXPIRED = "covered", "capped", "expired"
CASE_HOLDING = (UNATTESTED, ATTESTED, SLASHED)  # statuses that hold the node's one case of an epoch


def _error_name(error: Exception) -> str:
    return getattr(error, "error_name", None) or ""


def _hex(tx_hash) -> str | None:
    if tx_hash is None or isinstance(tx_hash, str):
        return tx_hash
    return "0x" + bytes(tx_hash).hex()


def evidence_record(check: SpotCheck, leaf: bytes) -> bytes:
    """The re-execution record of a failed check, canonical JSON; its keccak is the case's ``recordHash``. Rebuilt
    from the database the same way on every retry, so an arbiter given the row can check the hash."""
    record = {
        "epoch": int(check.epoch_number),
        "receiptLeaf": "0x" + bytes(leaf).hex(),
        "node": check.node,
        "status": check.status,
        "executions": int(check.executions or 0),
        "detail": check.detail or "",
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class CaseEvidence:
    """What ``Chain.attest_spot_check_failure`` takes for one failed check."""

    epoch: int
    receipt: dict
    signature: bytes
    proof: list[bytes]
    record_hash: bytes
    leaf: bytes
    node: str

    def chain_args(self) -> dict:
        return {
            "epoch": self.epoch,
            "receipt": self.receipt,
            "signature": self.signature,
            "proof": self.proof,
            "record_hash": self.record_hash,
        }


def case_evidence(session, check: SpotCheck) -> CaseEvidence:
    row = session.get(Receipt, check.receipt_id)
    signed = crud.signed_receipt_of(row)
    leaves = crud.epoch_leaves(session, epoch=row.epoch_number)
    return CaseEvidence(
        epoch=int(row.epoch_number),
        receipt=signed.receipt.to_message(),
        signature=bytes(signed.signature),
        proof=merkle_proof(leaves, leaves.index(bytes(row.leaf))),
        record_hash=keccak256(evidence_record(check, row.leaf)),
        leaf=bytes(row.leaf),
        node=row.node,
    )


def attest(chain, settings: Settings, evidence: CaseEvidence) -> tuple[str | None, str]:
    """Attest one failed check as the verifier account: (tx hash, slash status). Waits (``unattested``) while the
    epoch's root can still be corrected."""
    node, epoch = evidence.node, evidence.epoch
    final_at = int(chain.epoch_info(epoch)["finalAt"])
    if not final_at or chain.chain_time() < final_at:
        logger.info(
            f"The spot-check failure of {node} in epoch {epoch} waits for the epoch's root to become final "
            f"({'not committed yet' if not final_at else f'at chain time {final_at}'}); retried by the slash round"
        )
        return None, UNATTESTED
    try:
        result = chain.attest_spot_check_failure(settings.key_for("verifier"), **evidence.chain_args())
    except Exception as e:
        name = _error_name(e)
        outcome = {
            "AlreadyAttested": ATTESTED,  # an earlier run sent it and crashed before recording
            "CaseClosed": CLOSED,
            "NodeHasCaseInEpoch": COVERED,  # another failure of this node in this epoch is the case
            "EpochCaseCapReached": CAPPED,
            "EpochTooOld": EXPIRED,
        }.get(name)
        if outcome is not None:
            log = logger.error if outcome in (CAPPED, EXPIRED) else logger.info
            log(f"Spot-check failure of {node} in epoch {epoch} not attested on chain: {e} (recorded as {outcome})")
            return None, outcome
        logger.error(
            f"Could not attest the spot-check failure of {node} on chain ({type(e).__name__}: {e}); "
            f"the worker retries on its next slash round"
        )
        return None, UNATTESTED
    logger.warning(f"Attested a failed spot check of {node} in epoch {epoch} on chain (tx {_hex(result.tx_hash)})")
    return _hex(result.tx_hash), ATTESTED


def _slashed_on_chain(chain, case_id: bytes) -> bool:
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
            with session_scope(engine) as session:
                evidence = case_evidence(session, session.get(SpotCheck, check_id))
            tx_hash, status = attest(chain, settings, evidence)
            report.attested += status == ATTESTED
            report.waiting += status == UNATTESTED
        slash_tx = None
        if status == ATTESTED:
            try:
                slash_tx = _hex(chain.finalize_slash(settings.key_for("ledger"), leaf).tx_hash)
                status = SLASHED
                report.slashed += 1
                logger.warning(f"Slashed {node} on chain for a failed spot check (tx {slash_tx})")
            except Exception as e:
                name = _error_name(e)
                if name in ("DisputeWindowOpen", "CaseNotReady"):  # not yet: k attestations or the window missing
                    report.waiting += 1
                elif name == "CaseClosed":  # finalized by someone else (anyone may) or dismissed by the arbiter
                    status = SLASHED if _slashed_on_chain(chain, leaf) else CLOSED
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


__all__ = [
    "attest",
    "case_evidence",
    "evidence_record",
    "finalize_spot_check_slashes",
    "CaseEvidence",
    "SlashRound",
    "UNATTESTED",
    "ATTESTED",
    "SLASHED",
    "CLOSED",
    "COVERED",
    "CAPPED",
    "EXPIRED",
    "CASE_HOLDING",
]
