"""Database operations of the ledger: keyword-only functions that take a session and never commit it themselves."""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, or_, select, tuple_, update
from sqlalchemy.orm import Session

from nectar.ledger.intake import CheckedReceipt, Reason
from nectar.ledger.models import (
    ClientNode,
    Conflict,
    Epoch,
    EpochStatus,
    Node,
    Receipt,
    Settlement,
    SettlementItem,
    SettlementStatus,
    SpotCheck,
    Voucher,
    WorkStatus,
    utcnow,
)
from nectar.wire.merkle import merkle_root
from nectar.wire.receipts import Receipt as WireReceipt
from nectar.wire.receipts import SignedReceipt, SignedVoucher, channel_slot

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- nodes
def _touch_nodes(session: Session, *, addresses: Sequence[str]) -> dict[str, Node]:
    addresses = sorted(set(addresses))
    found = {n.address: n for n in session.scalars(select(Node).where(Node.address.in_(addresses)))}
    for address in addresses:
        if address not in found:
            found[address] = Node(
                address=address,
                earned_amount=0,
                settled_amount=0,
                stake=0,
                receipts_count=0,
                conflicts=0,
                spot_passed=0,
                spot_failed=0,
                slashes=0,
                uptime_ok=0,
                uptime_checks=0,
                successes=0,
                failures=0,
                work_steps=0,
                work_amount=0,
            )
            session.add(found[address])
    return found


def get_node(session: Session, *, address: str) -> Node | None:
    return session.get(Node, address)


def list_nodes(session: Session) -> list[Node]:
    return list(session.scalars(select(Node).order_by(Node.address)))


# ---------------------------------------------------------------------------------------------------- receipts
def _row_to_signed(row: Receipt) -> SignedReceipt:
    return SignedReceipt(
        WireReceipt(
            session_id=row.session_id,
            step=row.step,
            kind=row.kind,
            model_id=row.model_id,
            block_start=row.block_start,
            block_end=row.block_end,
            node=row.node,
            client=row.client,
            tokens=row.tokens,
            price=row.price,
            amount=row.amount,
            input_commitment=row.input_commitment,
            output_commitment=row.output_commitment,
            fingerprint=row.fingerprint_hash,
            timestamp=row.timestamp,
        ),
        row.signature,
    )


signed_receipt_of = _row_to_signed


def _merge(row: Receipt, c: CheckedReceipt, countersigned: list) -> str:
    """A resubmission of a stored receipt adds what the stored copy lacks: the client's countersignature (the node
    submitted first) or the fingerprint bytes (the client, which may not have them, submitted first)."""
    if row.fingerprint is None and c.fingerprint is not None:
        row.fingerprint = c.fingerprint
    if row.client_signature is None and c.countersignature is not None:
        row.client_signature = c.countersignature
        countersigned.append((row, c.staked))
        return "already stored; the client's countersignature is recorded"
    return "already stored (not counted twice)"


def store_receipts(
    session: Session,
    *,
    checked: Sequence[CheckedReceipt],
    limits: WorkLimits | None = None,
    read_reserve: ReadReserve | None = None,
) -> list[tuple[str, str | None, str]]:
    """Classify receipts that passed the stateless checks against what is stored, and insert the new ones.

    Returns per item (status, reason, message), status in accepted / duplicate / rejected. A conflict (same work and
    input, client and model, a different output: what ``Slashing.slashDoubleSign`` accepts) is rejected and kept as
    slashing evidence; other metadata under the same work is a replay; an identical resubmission is a duplicate
    (counted once). Countersigned receipts then count as their node's work as far as the client's backing covers them
    (``count_work``; ``read_reserve`` reads the client's reserve for the node from the chain).
    """
    results: list[tuple[str, str | None, str]] = [("", None, "")] * len(checked)
    pending = [(i, c) for i, c in enumerate(checked) if c.reason is None]
    for i, c in enumerate(checked):
        if c.reason is not None:
            results[i] = ("rejected", c.reason, c.message)
    if not pending:
        return results

    by_leaf = {
        row.leaf: row for row in session.scalars(select(Receipt).where(Receipt.leaf.in_([c.leaf for _, c in pending])))
    }
    pairs = sorted({(c.signed.receipt.session_id, c.signed.receipt.node) for _, c in pending})
    by_key: dict[tuple, Receipt] = {}
    for start in range(0, len(pairs), 500):
        chunk = pairs[start : start + 500]
        rows = session.scalars(select(Receipt).where(tuple_(Receipt.session_id, Receipt.node).in_(chunk)))
        for row in rows:
            by_key[(row.session_id, row.node, row.kind, row.step, row.block_start, row.block_end)] = row

    new_rows: list[Receipt] = []
    countersigned: list[tuple[Receipt, bool]] = []  # (row, node staked) newly countersigned
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i, c in pending:
        r = c.signed.receipt
        if c.leaf in by_leaf:
            results[i] = ("duplicate", None, _merge(by_leaf[c.leaf], c, countersigned))
            continue
        existing = by_key.get(r.key)
        if existing is not None and existing.leaf == c.leaf:
            # stored by a concurrent submitter between the leaf and key queries (READ COMMITTED: each query sees
            # the latest commits), so the leaf query missed it: the same receipt, not a replay
            results[i] = ("duplicate", None, _merge(existing, c, countersigned))
            continue
        if existing is not None:
            # evidence only where the chain's predicate holds: the node answered one input (same client, model) two
            # ways. Another input under the same work key is the client's doing and must not frame the node.
            same_question = (existing.input_commitment, existing.client, existing.model_id) == (
                r.input_commitment,
                r.client,
                r.model_id,
            )
            if same_question and existing.output_commitment != r.output_commitment:
                results[i] = (
                    "rejected",
                    Reason.CONFLICT,
                    "conflicts with a stored receipt for the same work (different output); kept as evidence",
                )
                if existing.id is None:
                    session.flush()
                _record_conflict(session, existing=existing, other=c.signed)
            else:
                results[i] = ("rejected", Reason.REPLAY, "this work is already receipted with different metadata")
            continue
        row = Receipt(
            leaf=c.leaf,
            session_id=r.session_id,
            step=r.step,
            kind=r.kind,
            model_id=r.model_id,
            block_start=r.block_start,
            block_end=r.block_end,
            node=r.node,
            client=r.client,
            tokens=r.tokens,
            price=r.price,
            amount=r.amount,
            input_commitment=r.input_commitment,
            output_commitment=r.output_commitment,
            fingerprint_hash=r.fingerprint,
            fingerprint=c.fingerprint,
            timestamp=r.timestamp,
            signature=c.signed.signature,
            client_signature=c.countersignature,
        )
        if c.countersignature is not None:
            countersigned.append((row, c.staked))
        session.add(row)  # now, so a later item of this batch that conflicts with it can flush it and cite its id
        new_rows.append(row)
        by_leaf[c.leaf] = row
        by_key[r.key] = row
        totals[r.node][0] += 1
        totals[r.node][1] += r.amount
        results[i] = ("accepted", None, "")
    nodes = _touch_nodes(session, addresses=list(totals))
    now = utcnow()
    for address, (count, amount) in totals.items():
        node = nodes[address]
        node.receipts_count = (node.receipts_count or 0) + count
        node.earned_amount = (node.earned_amount or 0) + amount
        node.last_seen = now
    session.flush()
    if countersigned:
        _record_countersigned(session, countersigned, limits or WorkLimits(), read_reserve)
    return results


# ---------------------------------------------------------------------------------------------------- work
ReadReserve = Callable[[str, str], "int | None"]  # (client, node) -> reserve less pending release, None: unreadable


@dataclass(frozen=True)
class WorkLimits:
    """Bounds of the work and report book (``Settings``; docs/economics.md, "Reputation inputs")."""

    backed_ttl_s: float = 60.0  # how long a chain read of a client's reserve for a node is trusted
    max_clients_per_node: int = 10_000  # ClientNode rows per node: the least backed gives way
    max_nodes_per_client: int = 1_000  # ClientNode rows per client
    max_pending_per_pair: int = 10_000  # countersigned receipts waiting for backing per pair (older are dropped
    # from the queue: they stay stored, never count)
    report_min_backing: int = 10**15  # what a client must have paid the node on chain or hold in reserve to report
    report_burst: float = 3.0  # reports one client may send about one node at once
    report_per_hour: float = 12.0  # and then at this rate


def _settled(session: Session, *, client: str, node: str) -> int:
    """What the chain paid on ``client``'s channels to ``node`` (recorded as the ledger's settlements confirm)."""
    rows = session.scalars(select(Voucher.settled_amount).where(Voucher.client == client, Voucher.node == node))
    return sum(int(v or 0) for v in rows)


def client_node(session: Session, *, client: str, node: str, limits: WorkLimits) -> ClientNode:
    """The (client, node) row, created if missing; past a bound, the node's (or client's) row with the least counted
    work gives way (its counted work stays in ``Node.work_*``)."""
    # locked: two submitters counting one pair's receipts must not both spend the same backing
    row = session.scalar(
        select(ClientNode).where(ClientNode.client == client, ClientNode.node == node).with_for_update()
    )
    if row is not None:
        return row
    for column, value, bound in (
        (ClientNode.node, node, limits.max_clients_per_node),
        (ClientNode.client, client, limits.max_nodes_per_client),
    ):
        if (session.scalar(select(func.count(ClientNode.id)).where(column == value)) or 0) >= bound:
            victim = session.scalar(
                select(ClientNode)
                .where(column == value)
                .order_by(ClientNode.counted_steps, ClientNode.updated_at, ClientNode.id)
                .limit(1)
            )
            session.delete(victim)
            session.flush()
    row = ClientNode(
        client=client,
        node=node,
        countersigned_steps=0,
        countersigned_amount=0,
        counted_steps=0,
        counted_amount=0,
        backed=0,
        backed_read_at=0.0,
        report_nonce=0,
        report_tokens=limits.report_burst,
        report_at=0.0,
    )
    session.add(row)
    session.flush()
    return row


def backing_of(
    session: Session,
    pair: ClientNode,
    *,
    limits: WorkLimits,
    read_reserve: ReadReserve | None,
    need: int = 0,
    now: float | None = None,
) -> int:
    """What on chain backs the pair's client at its node: settled payments plus (a fresh enough read of) the
    reserve; read again from the chain when less than ``need`` and the last read is older than ``backed_ttl_s``."""
    import time

    now = time.time() if now is None else now
    settled = _settled(session, client=pair.client, node=pair.node)
    fresh = now - (pair.backed_read_at or 0.0) < limits.backed_ttl_s
    backed = max(settled, int(pair.backed or 0)) if fresh else settled
    if backed < need and not fresh and read_reserve is not None:
        reserve = read_reserve(pair.client, pair.node)
        if reserve is not None:
            # settling moves reserve into settled: their sum is what backs the client until it adds or releases
            pair.backed, pair.backed_read_at = settled + max(int(reserve), 0), now
            backed = int(pair.backed)
    return backed


def _record_countersigned(session: Session, rows: list[tuple[Receipt, bool]], limits: WorkLimits, read_reserve):
    pairs = set()
    for row, staked in rows:
        row.work = WorkStatus.UNSTAKED if not staked else WorkStatus.FREE if not row.amount else WorkStatus.PENDING
        pair = client_node(session, client=row.client, node=row.node, limits=limits)
        pair.countersigned_steps = (pair.countersigned_steps or 0) + 1
        pair.countersigned_amount = int(pair.countersigned_amount or 0) + int(row.amount)
        if row.work == WorkStatus.PENDING:
            pairs.add((row.client, row.node))
    session.flush()
    for client, node in sorted(pairs):
        count_work(session, client=client, node=node, limits=limits, read_reserve=read_reserve)


def count_work(
    session: Session, *, client: str, node: str, limits: WorkLimits, read_reserve: ReadReserve | None = None
) -> int:
    """Counts the pair's pending countersigned receipts, oldest first, as the node's work while the client's backing
    covers them (counted amount never above it); returns how many were counted. Called as receipts come and when a
    settlement of the pair confirms."""
    pair = client_node(session, client=client, node=node, limits=limits)
    waiting = list(
        session.scalars(
            select(Receipt)
            .where(Receipt.client == client, Receipt.node == node, Receipt.work == WorkStatus.PENDING)
            .order_by(Receipt.id)
            .limit(limits.max_pending_per_pair + 1)
        )
    )
    if not waiting:
        return 0
    if len(waiting) > limits.max_pending_per_pair:  # bound the queue: the oldest stay stored, never count
        for row in waiting[: len(waiting) - limits.max_pending_per_pair]:
            row.work = None
        waiting = waiting[len(waiting) - limits.max_pending_per_pair :]
    counted = int(pair.counted_amount or 0)
    backed = backing_of(session, pair, limits=limits, read_reserve=read_reserve, need=counted + int(waiting[0].amount))
    steps = amount = 0
    for row in waiting:
        if counted + amount + int(row.amount) > backed:
            break
        row.work = WorkStatus.COUNTED
        steps, amount = steps + 1, amount + int(row.amount)
    if steps:
        pair.counted_steps = (pair.counted_steps or 0) + steps
        pair.counted_amount = counted + amount
        n = _touch_nodes(session, addresses=[node])[node]
        n.work_steps = (n.work_steps or 0) + steps
        n.work_amount = int(n.work_amount or 0) + amount
    session.flush()
    return steps


def _record_conflict(session: Session, *, existing: Receipt, other: SignedReceipt) -> None:
    from nectar.wire.eip712 import receipt_leaf

    other_leaf = receipt_leaf(other.receipt)
    if session.scalar(select(Conflict.id).where(Conflict.receipt_id == existing.id, Conflict.other_leaf == other_leaf)):
        return
    session.add(
        Conflict(
            node=existing.node,
            receipt_id=existing.id,
            other_leaf=other_leaf,
            other_receipt=json.dumps(other.to_json()),
            status="pending",
        )
    )
    node = _touch_nodes(session, addresses=[existing.node])[existing.node]
    node.conflicts = (node.conflicts or 0) + 1
    logger.warning(f"Node {existing.node} signed two receipts for the same work; kept as slashing evidence")


def list_receipts(
    session: Session, *, node: str | None = None, epoch: int | None = None, limit: int = 100, offset: int = 0
) -> list[Receipt]:
    query = select(Receipt).order_by(Receipt.id).limit(limit).offset(offset)
    if node:
        query = query.where(Receipt.node == node)
    if epoch is not None:
        query = query.where(Receipt.epoch_number == epoch)
    return list(session.scalars(query))


def count_receipts(session: Session, *, node: str | None = None) -> int:
    query = select(func.count(Receipt.id))
    return session.scalar(query.where(Receipt.node == node) if node else query) or 0


def session_receipts(
    session: Session, *, session_id: bytes, node: str, kind: int, block_start: int, block_end: int
) -> list[Receipt]:
    """All stored receipts of one node's span in one session, in step order (the spot checks' input history)."""
    rows = session.scalars(
        select(Receipt).where(
            Receipt.session_id == session_id,
            Receipt.node == node,
            Receipt.kind == kind,
            Receipt.block_start == block_start,
            Receipt.block_end == block_end,
        )
    )
    return sorted(rows, key=lambda row: row.step)


def list_conflicts(session: Session, *, status: str | None = None, node: str | None = None) -> list[Conflict]:
    query = select(Conflict).order_by(Conflict.id)
    if status:
        query = query.where(Conflict.status == status)
    if node:
        query = query.where(Conflict.node == node)
    return list(session.scalars(query))


# ---------------------------------------------------------------------------------------------------- vouchers
def store_vouchers(session: Session, *, vouchers: Sequence[SignedVoucher]) -> list[tuple[str, str | None, str]]:
    """Keep the highest voucher per channel. Lower than stored: a stale replay (rejected); equal: a duplicate."""
    results: list[tuple[str, str | None, str]] = []
    for signed in vouchers:
        v = signed.voucher
        row = session.scalar(
            select(Voucher).where(
                Voucher.client == v.client,
                Voucher.node == v.node,
                Voucher.partner == v.partner,
                Voucher.channel_id == v.channel_id,
            )
        )
        if row is None:
            session.add(
                Voucher(
                    client=v.client,
                    node=v.node,
                    partner=v.partner,
                    channel_id=v.channel_id,
                    settled_amount=0,
                    cumulative_amount=v.cumulative_amount,
                    signature=signed.signature,
                )
            )
            session.flush()
            results.append(("accepted", None, ""))
        elif v.cumulative_amount > row.cumulative_amount:
            row.cumulative_amount, row.signature = v.cumulative_amount, signed.signature
            results.append(("accepted", None, ""))
        elif v.cumulative_amount == row.cumulative_amount:
            results.append(("duplicate", None, "this cumulative amount is already stored"))
        else:
            results.append(
                (
                    "rejected",
                    Reason.STALE_VOUCHER,
                    f"cumulative amount {v.cumulative_amount} is below the stored {row.cumulative_amount}",
                )
            )
    _touch_nodes(session, addresses=[s.voucher.node for s in vouchers])
    session.flush()
    return results


def list_vouchers(session: Session, *, node: str | None = None, client: str | None = None) -> list[Voucher]:
    query = select(Voucher).order_by(Voucher.id)
    if node:
        query = query.where(Voucher.node == node)
    if client:
        query = query.where(Voucher.client == client)
    return list(session.scalars(query))


# ---------------------------------------------------------------------------------------------------- epochs
def current_epoch(session: Session) -> Epoch:
    epoch = session.scalar(select(Epoch).where(Epoch.status == EpochStatus.COLLECTING).order_by(Epoch.number.desc()))
    if epoch is None:
        last = session.scalar(select(func.max(Epoch.number))) or 0
        epoch = Epoch(number=last + 1, status=EpochStatus.COLLECTING, receipt_count=0, total_amount=0)
        session.add(epoch)
        session.flush()
    return epoch


def retired_amounts(session: Session) -> dict[int, int]:
    """Voucher id -> the highest amount the chain refused to pay on it (a ``skipped`` settlement item: the client's
    escrow did not cover it, or the voucher failed on chain). A voucher not above that amount is retired: recorded as
    unpaid (the reason is its settlement's ``last_error``) and not sent again until a higher voucher comes or the
    chain would pay it (``requeue_retired``), so it cannot keep every epoch open (issue 22)."""
    out: dict[int, int] = {}
    rows = session.execute(
        select(SettlementItem.voucher_id, SettlementItem.cumulative_amount).where(SettlementItem.status == "skipped")
    )
    for voucher_id, amount in rows:
        out[voucher_id] = max(out.get(voucher_id, 0), amount)
    return out


def settleable_vouchers(session: Session) -> list[Voucher]:
    """Vouchers above what the chain paid on them and not retired (``retired_amounts``)."""
    retired = retired_amounts(session)
    return [
        v
        for v in session.scalars(select(Voucher).order_by(Voucher.id))
        if v.cumulative_amount > v.settled_amount and retired.get(v.id, -1) < v.cumulative_amount
    ]


def retired_vouchers(session: Session) -> list[Voucher]:
    """Vouchers still unpaid because the chain refused their current amount (``retired_amounts``)."""
    retired = retired_amounts(session)
    return [
        v
        for v in session.scalars(select(Voucher).where(Voucher.id.in_(list(retired))).order_by(Voucher.id))
        if v.settled_amount < v.cumulative_amount <= retired[v.id]
    ]


def requeue_retired(session: Session, *, voucher_ids: Sequence[int]) -> int:
    """Retired vouchers the chain would now pay go back in the queue: their skipped items become ``requeued``.
    Returns how many items."""
    result = session.execute(
        update(SettlementItem)
        .where(SettlementItem.status == "skipped", SettlementItem.voucher_id.in_(list(voucher_ids)))
        .values(status="requeued")
    )
    return result.rowcount


def has_unsettled_vouchers(session: Session) -> bool:
    return bool(settleable_vouchers(session))


def close_epoch(session: Session, *, allow_empty: bool = False) -> Epoch | None:
    """Freeze the collecting epoch: assign it every unassigned receipt (atomically), compute its root, open the next.

    Returns the closed epoch, or None when there was nothing to close (no receipt and no voucher to settle).
    """
    epoch = session.scalar(select(Epoch).where(Epoch.number == current_epoch(session).number).with_for_update())
    if epoch.status != EpochStatus.COLLECTING:  # closed by someone else since we looked
        return None
    unassigned = session.scalar(select(func.count(Receipt.id)).where(Receipt.epoch_number.is_(None))) or 0
    if not unassigned and not allow_empty and not has_unsettled_vouchers(session):
        return None
    session.execute(update(Receipt).where(Receipt.epoch_number.is_(None)).values(epoch_number=epoch.number))
    rows = session.execute(select(Receipt.leaf, Receipt.amount).where(Receipt.epoch_number == epoch.number)).all()
    epoch.root = merkle_root([leaf for leaf, _ in rows])
    epoch.receipt_count = len(rows)
    epoch.total_amount = sum(amount for _, amount in rows)
    epoch.status, epoch.closed_at = EpochStatus.CLOSED, utcnow()
    session.add(Epoch(number=epoch.number + 1, status=EpochStatus.COLLECTING, receipt_count=0, total_amount=0))
    session.flush()
    logger.info(f"Closed epoch {epoch.number}: {epoch.receipt_count} receipts, root 0x{epoch.root.hex()}")
    return epoch


def unfinished_epochs(session: Session) -> list[Epoch]:
    return list(
        session.scalars(
            select(Epoch)
            .where(Epoch.status.in_([EpochStatus.CLOSED, EpochStatus.ROOT_COMMITTED]))
            .order_by(Epoch.number)
        )
    )


def list_epochs(session: Session, *, limit: int = 50) -> list[Epoch]:
    return list(session.scalars(select(Epoch).order_by(Epoch.number.desc()).limit(limit)))


def epoch_leaves(session: Session, *, epoch: int) -> list[bytes]:
    return list(session.scalars(select(Receipt.leaf).where(Receipt.epoch_number == epoch)))


def acquire_epoch_lease(session: Session, *, epoch: int, owner: str, seconds: float) -> bool:
    """Claim an epoch for one worker; a crashed worker's claim lapses after ``seconds``."""
    now = utcnow()
    result = session.execute(
        update(Epoch)
        .where(
            Epoch.number == epoch, or_(Epoch.lease_owner.is_(None), Epoch.lease_owner == owner, Epoch.lease_until < now)
        )
        .values(lease_owner=owner, lease_until=now + timedelta(seconds=seconds))
    )
    return result.rowcount == 1


def release_epoch_lease(session: Session, *, epoch: int, owner: str) -> None:
    session.execute(
        update(Epoch)
        .where(Epoch.number == epoch, Epoch.lease_owner == owner)
        .values(lease_owner=None, lease_until=None)
    )


# ---------------------------------------------------------------------------------------------------- settlements
def prepare_settlements(session: Session, *, epoch: int, batch_size: int) -> list[Settlement]:
    """Fix (once) which vouchers this epoch settles: every channel whose latest voucher is above what was paid."""
    existing = list(
        session.scalars(select(Settlement).where(Settlement.epoch_number == epoch).order_by(Settlement.batch_index))
    )
    if existing:
        return existing
    busy = (
        select(SettlementItem.voucher_id)
        .join(Settlement)
        .where(
            Settlement.status.in_([SettlementStatus.PREPARED, SettlementStatus.SENT]),
            SettlementItem.status == "pending",
        )
    )
    busy_ids = set(session.scalars(busy))
    candidates = [v for v in settleable_vouchers(session) if v.id not in busy_ids]
    # one client's vouchers together (its escrow is written once per batch), the two channels of a storage slot side
    # by side (one cold write for both)
    candidates.sort(key=lambda v: (v.client.lower(), *channel_slot(v.node, v.partner, int(v.channel_id)), v.id))
    batches = []
    for index, start in enumerate(range(0, len(candidates), batch_size)):
        settlement = Settlement(epoch_number=epoch, batch_index=index, status=SettlementStatus.PREPARED, attempts=0)
        session.add(settlement)
        session.flush()
        for v in candidates[start : start + batch_size]:
            session.add(
                SettlementItem(
                    settlement_id=settlement.id,
                    voucher_id=v.id,
                    client=v.client,
                    node=v.node,
                    partner=v.partner,
                    channel_id=v.channel_id,
                    cumulative_amount=v.cumulative_amount,
                    signature=v.signature,
                    paid_before=v.settled_amount,
                    status="pending",
                )
            )
        batches.append(settlement)
    session.flush()
    return batches


def settlement_items(session: Session, *, settlement_id: int) -> list[SettlementItem]:
    return list(
        session.scalars(
            select(SettlementItem).where(SettlementItem.settlement_id == settlement_id).order_by(SettlementItem.id)
        )
    )


def mark_item_paid(
    session: Session, *, item: SettlementItem, paid_on_chain: int, limits: WorkLimits | None = None
) -> None:
    """Record that the chain has paid this voucher (``paid_on_chain`` >= its cumulative amount)."""
    if item.status == "paid":
        return
    item.status = "paid"
    voucher = session.get(Voucher, item.voucher_id)
    newly = max(0, min(paid_on_chain, item.cumulative_amount) - max(item.paid_before, 0))
    if voucher.settled_amount < item.cumulative_amount:
        voucher.settled_amount = item.cumulative_amount
    node = _touch_nodes(session, addresses=[item.node])[item.node]
    node.settled_amount = (node.settled_amount or 0) + newly
    session.flush()
    count_work(session, client=item.client, node=item.node, limits=limits or WorkLimits())  # paid: count what waited


def list_settlements(session: Session, *, epoch: int | None = None, node: str | None = None) -> list[Settlement]:
    query = select(Settlement).order_by(Settlement.id)
    if epoch is not None:
        query = query.where(Settlement.epoch_number == epoch)
    if node:
        query = query.where(Settlement.id.in_(select(SettlementItem.settlement_id).where(SettlementItem.node == node)))
    return list(session.scalars(query))


def node_settlement_items(session: Session, *, node: str, limit: int = 100) -> list[tuple[SettlementItem, Settlement]]:
    rows = session.execute(
        select(SettlementItem, Settlement)
        .join(Settlement)
        .where(SettlementItem.node == node)
        .order_by(SettlementItem.id.desc())
        .limit(limit)
    ).all()
    return [(item, settlement) for item, settlement in rows]


# ---------------------------------------------------------------------------------------------------- spot checks
def record_spot_check(
    session: Session,
    *,
    receipt: Receipt,
    status: str,
    executions: int,
    detail: str,
    attest_tx_hash: str | None = None,
    slash_status: str | None = None,
) -> SpotCheck:
    check = session.scalar(select(SpotCheck).where(SpotCheck.receipt_id == receipt.id))
    if check is None:
        check = SpotCheck(receipt_id=receipt.id, epoch_number=receipt.epoch_number, node=receipt.node, executions=0)
        session.add(check)
    first_verdict = check.status in (None, "pending", "error") and status in ("passed", "failed")
    check.status, check.executions, check.detail = status, executions, detail
    check.attest_tx_hash = attest_tx_hash or check.attest_tx_hash
    check.slash_status = slash_status or check.slash_status
    check.finished_at = utcnow()
    if first_verdict:
        node = _touch_nodes(session, addresses=[receipt.node])[receipt.node]
        if status == "passed":
            node.spot_passed = (node.spot_passed or 0) + 1
        else:
            node.spot_failed = (node.spot_failed or 0) + 1
    session.flush()
    return check


def spot_checks_to_slash(session: Session) -> list[tuple[SpotCheck, bytes]]:
    """Failed spot checks whose attestation must be (re)sent or whose slash is not final yet, with the evidence."""
    rows = session.execute(
        select(SpotCheck, Receipt.leaf)
        .join(Receipt, Receipt.id == SpotCheck.receipt_id)
        .where(SpotCheck.status == "failed", SpotCheck.slash_status.in_(["unattested", "attested"]))
        .order_by(SpotCheck.id)
    ).all()
    return [(check, leaf) for check, leaf in rows]


def node_epoch_case(
    session: Session, *, node: str, epoch: int, statuses: Sequence[str], exclude_id: int | None = None
) -> SpotCheck | None:
    """The failed check of ``node`` in ``epoch`` that holds (or is about to hold) its one on-chain case: the first
    with a slash status in ``statuses``."""
    query = select(SpotCheck).where(
        SpotCheck.node == node,
        SpotCheck.epoch_number == epoch,
        SpotCheck.status == "failed",
        SpotCheck.slash_status.in_(list(statuses)),
    )
    if exclude_id is not None:
        query = query.where(SpotCheck.id != exclude_id)
    return session.scalar(query.order_by(SpotCheck.id).limit(1))


def spot_checks_of(session: Session, *, epoch: int | None = None, node: str | None = None) -> list[SpotCheck]:
    query = select(SpotCheck).order_by(SpotCheck.id)
    if epoch is not None:
        query = query.where(SpotCheck.epoch_number == epoch)
    if node:
        query = query.where(SpotCheck.node == node)
    return list(session.scalars(query))


# ---------------------------------------------------------------------------------------------------- reputation inputs
def record_report(
    session: Session,
    *,
    node: str,
    online: bool | None = None,
    success: bool | None = None,
    latency_ms: float | None = None,
    throughput: float | None = None,
    alpha: float = 0.2,
) -> Node:
    row = _touch_nodes(session, addresses=[node])[node]
    if online is not None:
        row.uptime_checks = (row.uptime_checks or 0) + 1
        row.uptime_ok = (row.uptime_ok or 0) + int(online)
    if success is not None:
        row.successes = (row.successes or 0) + int(success)
        row.failures = (row.failures or 0) + int(not success)
    if latency_ms is not None:
        row.latency_ms = latency_ms if row.latency_ms is None else (1 - alpha) * row.latency_ms + alpha * latency_ms
    if throughput is not None:
        row.throughput = throughput if row.throughput is None else (1 - alpha) * row.throughput + alpha * throughput
    session.flush()
    return row


def admit_report(
    session: Session,
    *,
    reporter: str,
    node: str,
    nonce: int,
    limits: WorkLimits,
    read_reserve: ReadReserve | None,
    now: float,
) -> tuple[int, str] | None:
    """Whether a signed report counts: None if it does (its nonce and a unit of the rate bucket are spent), else
    (HTTP status, why). Only a client the chain shows paying the node (settled) or backing it (reserve), at least
    ``report_min_backing``, reports; each nonce once, increasing; at most ``report_burst`` then ``report_per_hour``."""
    existing = session.scalar(select(ClientNode).where(ClientNode.client == reporter, ClientNode.node == node))
    pair = existing or ClientNode(client=reporter, node=node, backed=0, backed_read_at=0.0)  # not stored unless backed
    backed = backing_of(
        session, pair, limits=limits, read_reserve=read_reserve, need=limits.report_min_backing, now=now
    )
    if backed < limits.report_min_backing:
        return 403, (
            f"only clients that paid this node on chain or hold a reserve for it (at least "
            f"{limits.report_min_backing} credit wei; {reporter} has {backed}) may report on it: reserve with "
            f"`nectar escrow reserve --node {node}` or pay it through the ledger, then report"
        )
    if existing is None:
        fresh = client_node(session, client=reporter, node=node, limits=limits)
        fresh.backed, fresh.backed_read_at = pair.backed, pair.backed_read_at
        pair = fresh
    if nonce <= int(pair.report_nonce or 0):
        return 409, f"report nonce {nonce} is not above the last accepted ({pair.report_nonce}): a replay, not counted"
    tokens = min(
        limits.report_burst,
        (pair.report_tokens or 0.0) + (now - (pair.report_at or 0.0)) * limits.report_per_hour / 3600,
    )
    if tokens < 1.0:
        wait = (1.0 - tokens) * 3600 / limits.report_per_hour
        return 429, f"at most {limits.report_per_hour:g} reports an hour per client and node; retry in {wait:.0f} s"
    pair.report_nonce, pair.report_tokens, pair.report_at = nonce, tokens - 1.0, now
    session.flush()
    return None


def record_slash(session: Session, *, node: str) -> None:
    row = _touch_nodes(session, addresses=[node])[node]
    row.slashes = (row.slashes or 0) + 1


def set_stake(session: Session, *, node: str, stake: int) -> None:
    _touch_nodes(session, addresses=[node])[node].stake = stake


def epoch_of(session: Session, *, number: int) -> Epoch | None:
    return session.get(Epoch, number)
