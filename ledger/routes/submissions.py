"""POST /v1/receipts and /v1/vouchers: per-item verdicts; any malformed item makes the whole request a 422."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, HTTPException
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from nectar.ledger import crud
from nectar.ledger.deps import StateDep
from nectar.ledger.intake import (
    Malformed,
    Reason,
    bound_unregistered,
    check_receipt,
    check_voucher,
    parse_receipt_item,
    parse_voucher_item,
)
from nectar.ledger.models import Node, Receipt
from nectar.ledger.schemas import BatchResult, ItemResult, ReceiptBatch, VoucherBatch
from nectar.ledger.stakes import NoChain
from nectar.wire.fingerprints import ComputeSpec
from nectar.wire.ledger_api import MAX_FINGERPRINT_BYTES, MAX_ITEM_STRING_CHARS, PREFIX, RECEIPTS, VOUCHERS

logger = logging.getLogger(__name__)
router = APIRouter(prefix=PREFIX, tags=["submissions"])


def _oversized(item, path: str = "") -> str | None:
    """Names the first field of a submitted item over its size bound (checked before parsing, so nothing oversized is
    decoded or stored): any string but ``fingerprintBytes`` (``_drop_oversized_fingerprints``) at most
    ``MAX_ITEM_STRING_CHARS``; items nest at most two levels (``{"receipt": {...}}``)."""
    if not isinstance(item, dict):
        return None
    for key, value in item.items():
        name = f"{path}{key}"
        if isinstance(value, dict):
            if path:
                return f"{name} nests too deep (an item is at most {{'receipt'|'voucher': {{...}}, ...}})"
            if problem := _oversized(value, f"{name}."):
                return problem
        elif isinstance(value, list):
            return f"{name} is a list; no field of an item is"
        elif isinstance(value, str) and name != "fingerprintBytes" and len(value) > MAX_ITEM_STRING_CHARS:
            return f"{name} has {len(value)} characters, at most {MAX_ITEM_STRING_CHARS} allowed"
    return None


def _drop_oversized_fingerprints(items: list) -> dict[int, int]:
    """Index -> size of each item whose ``fingerprintBytes`` is over ``MAX_FINGERPRINT_BYTES``: those bytes are
    dropped unread (the item is rejected as ``bad_fingerprint``, so an old node's batch still stores the rest)."""
    oversized = {}
    for index, item in enumerate(items):
        raw = item.get("fingerprintBytes") if isinstance(item, dict) else None
        if isinstance(raw, str) and len(raw) > 2 + 2 * MAX_FINGERPRINT_BYTES:
            oversized[index] = len(raw.removeprefix("0x")) // 2
            items[index] = {**item, "fingerprintBytes": "0x"}
    return oversized


def _parse_all(items: list, parse) -> list:
    parsed, errors = [], []
    for index, item in enumerate(items):
        if problem := _oversized(item):
            errors.append({"index": index, "error": problem})
            continue
        try:
            parsed.append(parse(item))
        except Malformed as e:
            errors.append({"index": index, "error": str(e)})
    if errors:
        raise HTTPException(422, {"message": "malformed items; nothing from this request was stored", "items": errors})
    return parsed


class _Unstorable(Exception):
    """The database kept refusing the batch with an integrity error: not a race, some item cannot be stored."""


def _with_retries(state, work):
    """Two submitters inserting the same work race on a unique key: retry so the loser sees the winner's rows."""
    for attempt in range(5):
        try:
            with Session(state.engine, expire_on_commit=False) as session, session.begin():
                return work(session)
        except (IntegrityError, OperationalError) as e:
            if attempt == 4:
                if isinstance(e, IntegrityError):
                    raise _Unstorable(str(e)) from None
                raise HTTPException(503, f"database busy, retry the request ({type(e).__name__})") from None
            time.sleep(0.05 * (attempt + 1))


def _store_receipts_one_by_one(state, checked) -> list:
    """A batch the database refuses as a whole is stored item by item, so one bad item cannot block a node's queue
    (nodes retry a failed POST forever) and everything else in it is still stored."""
    verdicts = []
    for c in checked:
        try:
            verdicts += _with_retries(state, lambda session, c=c: _store(state, session, [c]))
        except _Unstorable as e:
            logger.error(f"Receipt 0x{c.leaf.hex()} of node {c.signed.receipt.node} could not be stored: {e}")
            verdicts.append(
                (
                    "rejected",
                    Reason.UNSTORABLE,
                    "the ledger could not store this receipt (logged there); do not resend it",
                )
            )
    return verdicts


def _store(state, session, checked) -> list:
    return crud.store_receipts(
        session, checked=checked, limits=state.settings.work_limits, read_reserve=state.read_reserve
    )


def _gate_work(state, checked) -> None:
    """Countersigned receipts of nodes not registered with the minimum stake are stored as evidence, never as the
    node's work (``WorkStatus.UNSTAKED``). Without a deployment nothing is backed on chain, so nothing counts anyway."""
    nodes = {c.signed.receipt.node for c in checked if c.reason is None and c.countersignature is not None}
    if not nodes or not state.settings.require_stake or state.stakes is None:
        return
    try:
        unstaked = {node for node in nodes if not state.stakes.eligible(node)}
    except NoChain:
        return
    except Exception as e:  # chain unreachable: the submitter's queue retries the batch later
        raise HTTPException(
            503, f"the ledger could not read stakes from the chain ({type(e).__name__}); retry"
        ) from None
    for c in checked:
        if c.signed.receipt.node in unstaked:
            c.staked = False


def _registered(state, node: str) -> bool:
    """Known to the registry (registered, even below the minimum or unbonding: its stake can still be slashed); a
    node that registered a moment ago is found as ``StakeBook.eligible`` finds it (a re-read, or a bounded direct
    one)."""
    entry = state.stakes.table().get(node)
    return (entry is not None and entry.registered) or state.stakes.eligible(node)


def _bound_unregistered(state, checked) -> None:
    """Receipts of keys the registry does not know are evidence only (with the stake gate on): bounded per key and in
    all (``intake.bound_unregistered``). Concurrent batches may each pass the bound once (by at most ``max_batch``)."""
    nodes = {c.signed.receipt.node for c in checked if c.reason is None}
    if not nodes or not state.settings.require_stake or state.stakes is None:  # ungated: unstaked work counts
        return
    try:
        unregistered = {node for node in nodes if not _registered(state, node)}
        table = state.stakes.table() if unregistered else None
    except NoChain:
        return
    except Exception as e:  # chain unreachable: the submitter's queue retries the batch later
        raise HTTPException(
            503, f"the ledger could not read stakes from the chain ({type(e).__name__}); retry"
        ) from None
    if not unregistered:
        return
    registered = sorted({n.address for n in table.nodes.values()})
    leaves = [c.leaf for c in checked if c.reason is None and c.signed.receipt.node in unregistered]
    with Session(state.engine) as session:
        rows = session.execute(select(Node.address, Node.receipts_count).where(Node.address.in_(sorted(unregistered))))
        stored = {address: int(count or 0) for address, count in rows}
        everyone = session.scalar(select(func.coalesce(func.sum(Node.receipts_count), 0))) or 0
        staked = 0
        for start in range(0, len(registered), 500):
            chunk = registered[start : start + 500]
            staked += (
                session.scalar(select(func.coalesce(func.sum(Node.receipts_count), 0)).where(Node.address.in_(chunk)))
                or 0
            )
        known = set(session.scalars(select(Receipt.leaf).where(Receipt.leaf.in_(leaves))))
    settings = state.settings
    bound_unregistered(
        checked,
        unregistered=unregistered,
        stored=stored,
        stored_total=int(everyone) - int(staked),
        known_leaves=known,
        per_key=settings.unregistered_receipts_per_key,
        total=settings.unregistered_receipts_total,
    )


def _summarise(verdicts, leaves=None) -> BatchResult:
    results = [
        ItemResult(
            index=i,
            status=status,
            reason=reason,
            message=message,
            leaf=None if leaves is None else "0x" + leaves[i].hex(),
        )
        for i, (status, reason, message) in enumerate(verdicts)
    ]
    count = lambda s: sum(r.status == s for r in results)  # noqa: E731
    return BatchResult(
        accepted=count("accepted"), duplicates=count("duplicate"), rejected=count("rejected"), results=results
    )


@router.post(RECEIPTS, response_model=BatchResult)
def submit_receipts(batch: ReceiptBatch, state: StateDep) -> BatchResult:
    if len(batch.receipts) > state.settings.max_batch:
        raise HTTPException(413, f"at most {state.settings.max_batch} receipts per request; split the batch")
    oversized = _drop_oversized_fingerprints(batch.receipts)
    parsed = _parse_all(batch.receipts, parse_receipt_item)
    domain = state.domains.get()
    now, settings = time.time(), state.settings
    checked = [
        check_receipt(
            signed,
            fingerprint,
            domain,
            countersignature=countersignature,
            now=now,
            max_age=settings.receipt_max_age_s,
            max_skew=settings.receipt_max_skew_s,
        )
        for signed, fingerprint, countersignature in parsed
    ]
    for index, size in oversized.items():
        checked[index].reason = Reason.BAD_FINGERPRINT
        checked[index].message = (
            f"fingerprintBytes of {size} bytes; at most {MAX_FINGERPRINT_BYTES} are taken (a compute descriptor is "
            f"{len(ComputeSpec().encode())}): run a node of this release"
        )
    _gate_work(state, checked)
    _bound_unregistered(state, checked)
    try:
        verdicts = _with_retries(state, lambda session: _store(state, session, checked))
    except _Unstorable:
        verdicts = _store_receipts_one_by_one(state, checked)
    result = _summarise(verdicts, [c.leaf for c in checked])
    if result.rejected:
        reasons = sorted({r.reason for r in result.results if r.reason})
        logger.info(
            f"Receipts: {result.accepted} accepted, {result.duplicates} duplicate, {result.rejected} rejected {reasons}"
        )
    return result


def _gate_stake(state, parsed, checks):
    """Refuses vouchers to nodes not registered with the minimum stake: the ledger never spends gas paying a node
    that clients should not have routed to. Receipts are kept whoever signed them (they are evidence for spot checks
    and double-sign slashing, and reputation), so only payment is gated. No deployment file: nothing can be
    settled, so there is nothing to gate."""
    if not state.settings.require_stake or state.stakes is None:
        return checks
    nodes = {signed.voucher.node for signed, (reason, _) in zip(parsed, checks) if reason is None}
    try:
        refused = {node for node in nodes if not state.stakes.eligible(node)}
    except NoChain:
        return checks
    except Exception as e:  # chain unreachable: the node's queue retries the batch later
        raise HTTPException(
            503, f"the ledger could not read stakes from the chain ({type(e).__name__}); retry"
        ) from None
    if not refused:
        return checks
    gated = []
    for signed, (reason, message) in zip(parsed, checks):
        if reason is None and signed.voucher.node in refused:
            reason, message = (
                Reason.NOT_STAKED,
                f"node {signed.voucher.node} is not registered with the minimum stake on this ledger's deployment: "
                "its operator runs `nectar operator register` (or `nectar operator stake`), then resends",
            )
        gated.append((reason, message))
    return gated


@router.post(VOUCHERS, response_model=BatchResult)
def submit_vouchers(batch: VoucherBatch, state: StateDep) -> BatchResult:
    if len(batch.vouchers) > state.settings.max_batch:
        raise HTTPException(413, f"at most {state.settings.max_batch} vouchers per request; split the batch")
    parsed = _parse_all(batch.vouchers, parse_voucher_item)
    domain = state.domains.get()
    checks = _gate_stake(state, parsed, [check_voucher(signed, domain) for signed in parsed])
    good = [signed for signed, (reason, _) in zip(parsed, checks) if reason is None]
    try:
        stored = iter(_with_retries(state, lambda session: crud.store_vouchers(session, vouchers=good)) if good else [])
    except _Unstorable as e:
        raise HTTPException(
            500, f"the ledger could not store this voucher batch ({e}); send the vouchers one by one"
        ) from None
    verdicts = [("rejected", reason, message) if reason else next(stored) for reason, message in checks]
    return _summarise(verdicts)
