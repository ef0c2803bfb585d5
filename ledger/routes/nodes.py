"""Node views, reputation and client reports."""

from __future__ import annotations

import logging
import time

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_address, to_checksum_address
from fastapi import APIRouter, Header, HTTPException

from nectar.ledger import crud
from nectar.ledger.deps import SessionDep, StateDep, is_admin
from nectar.ledger.reputation import rank, score_node
from nectar.ledger.schemas import ReportIn
from nectar.wire.ledger_api import NODE, PREFIX, REPORTS, REPUTATION, report_message

logger = logging.getLogger(__name__)
router = APIRouter(prefix=PREFIX, tags=["nodes"])


def _address(value: str) -> str:
    if not is_address(value):
        raise HTTPException(422, f"{value!r} is not an Ethereum address (0x + 40 hex digits)")
    return to_checksum_address(value)


@router.get(NODE)
def node_view(
    address: str,
    session: SessionDep,
    state: StateDep,
    limit: int = 50,
    authorization: str | None = Header(default=None),
) -> dict:
    """A node's public record. Session ids (which link a user's steps, and name what an audit would fetch) are shown
    only with the admin token."""
    address = _address(address)
    admin = is_admin(state, authorization)  # constant time
    node = crud.get_node(session, address=address)
    if node is None:
        raise HTTPException(404, f"the ledger has never seen node {address}")
    score = score_node(
        node,
        reference_stake=state.settings.reference_stake,
        spot_fail_factor=state.settings.spot_check_reputation_penalty,
    )
    receipts = crud.list_receipts(session, node=address, limit=min(limit, 500))
    settlements = crud.node_settlement_items(session, node=address, limit=min(limit, 500))
    return {
        "address": address,
        "receipts_count": node.receipts_count,  # stored: the node's claims and the evidence against it
        "claimed": str(node.earned_amount),  # what those receipts say; nobody vouches for it
        "work_steps": node.work_steps or 0,  # counted work: countersigned by clients whose payment covered it
        "earned": str(node.work_amount or 0),
        "settled": str(node.settled_amount),
        "conflicts": [
            {"id": c.id, "status": c.status, "slash_tx_hash": c.slash_tx_hash}
            for c in crud.list_conflicts(session, node=address)
        ],
        "recent_receipts": [
            {
                "leaf": "0x" + r.leaf.hex(),
                **({"session_id": "0x" + r.session_id.hex()} if admin else {}),
                "step": r.step,
                "kind": r.kind,
                "client": r.client,
                "amount": str(r.amount),
                "epoch": r.epoch_number,
            }
            for r in receipts
        ],
        "settlements": [
            {
                "epoch": s.epoch_number,
                "client": i.client,
                "partner": i.partner,
                "channel_id": i.channel_id,
                "cumulative_amount": str(i.cumulative_amount),
                "status": i.status,
                "tx_hash": s.tx_hash,
            }
            for i, s in settlements
        ],
        "spot_checks": {"passed": node.spot_passed, "failed": node.spot_failed},
        "reputation": score.to_json(),
    }


@router.get(REPUTATION)
def reputation(session: SessionDep, state: StateDep) -> dict:
    scores = rank(
        crud.list_nodes(session),
        reference_stake=state.settings.reference_stake,
        spot_fail_factor=state.settings.spot_check_reputation_penalty,
    )
    return {"nodes": [s.to_json() for s in scores], "generated_at": int(time.time())}


@router.post(REPORTS)
def report(body: ReportIn, session: SessionDep, state: StateDep) -> dict:
    """A paying client's measurement of a node: signed, fresh, once per nonce, only from a client the chain shows
    paying or backing the node, at a bounded rate per client and node (docs/economics.md, "Reputation inputs")."""
    node, reporter = _address(body.node), _address(body.reporter)
    now, settings = time.time(), state.settings
    if abs(now - body.timestamp) > settings.report_max_age_s:
        raise HTTPException(
            422,
            f"report timestamp is more than {settings.report_max_age_s:g} s off the ledger's clock; sign a fresh one",
        )
    try:
        signer = Account.recover_message(encode_defunct(text=report_message(body)), signature=body.signature)
    except Exception as e:
        raise HTTPException(422, f"malformed report signature ({e})") from None
    if signer != reporter:
        raise HTTPException(403, f"report signed by {signer}, not by the reporter {reporter}")
    refused = crud.admit_report(
        session,
        reporter=reporter,
        node=node,
        nonce=body.nonce,
        limits=settings.work_limits,
        read_reserve=state.read_reserve,
        now=now,
    )
    if refused is not None:
        raise HTTPException(*refused)
    crud.record_report(
        session,
        node=node,
        online=body.online,
        success=body.success,
        latency_ms=body.latency_ms,
        throughput=body.throughput,
    )
    return {"status": "recorded"}
