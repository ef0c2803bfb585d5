"""Database tables of the ledger (SQLAlchemy 2). Hashes are raw bytes, addresses checksum strings, and uint128/uint64
amounts decimal strings (SQLite has no 128-bit integers) through the ``UInt`` column type.
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

logger = logging.getLogger(__name__)

from nectar.service.columns import NAMING_CONVENTION, UInt, utcnow  # noqa: E402  (re-exported for migrations and crud)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class EpochStatus:
    COLLECTING = "collecting"  # receipts arrive (they are assigned to the epoch when it closes)
    CLOSED = "closed"  # receipts frozen, root computed, not yet on chain
    ROOT_COMMITTED = "root_committed"  # root on chain; vouchers being settled
    SETTLED = "settled"  # every settlement batch confirmed


class Epoch(Base):
    __tablename__ = "epochs"

    number: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(20), default=EpochStatus.COLLECTING)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    root: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    receipt_count: Mapped[int] = mapped_column(Integer, default=0)
    total_amount: Mapped[int] = mapped_column(UInt, default=0)
    root_tx_hash: Mapped[str | None] = mapped_column(String(66))
    spot_seed: Mapped[bytes | None] = mapped_column(LargeBinary(32))
    lease_owner: Mapped[str | None] = mapped_column(String(120))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)


class WorkStatus:
    """``Receipt.work``: whether a countersigned receipt counts as its node's work (docs/economics.md)."""

    PENDING = "pending"  # countersigned; waits for the client's backing (settled payment or reserve) to cover it
    COUNTED = "counted"  # in ``Node.work_steps`` / ``work_amount`` and its ``ClientNode.counted_*``
    UNSTAKED = "unstaked"  # the node was not registered with the minimum stake when it came: evidence only
    FREE = "free"  # amount 0: nothing was paid, so it proves nothing


class Receipt(Base):
    __tablename__ = "receipts"
    __table_args__ = (
        UniqueConstraint("session_id", "node", "kind", "step", "block_start", "block_end", name="uq_receipts_work"),
        Index("ix_receipts_node_epoch", "node", "epoch_number"),
        Index("ix_receipts_client_node", "client", "node"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    leaf: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    session_id: Mapped[bytes] = mapped_column(LargeBinary(32))
    step: Mapped[int] = mapped_column(UInt)
    kind: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[bytes] = mapped_column(LargeBinary(32))
    block_start: Mapped[int] = mapped_column(Integer)
    block_end: Mapped[int] = mapped_column(Integer)
    node: Mapped[str] = mapped_column(String(42))
    client: Mapped[str] = mapped_column(String(42))
    tokens: Mapped[int] = mapped_column(Integer)
    price: Mapped[int] = mapped_column(UInt)
    amount: Mapped[int] = mapped_column(UInt)
    input_commitment: Mapped[bytes] = mapped_column(LargeBinary(32))
    output_commitment: Mapped[bytes] = mapped_column(LargeBinary(32))
    fingerprint_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    fingerprint: Mapped[bytes | None] = mapped_column(LargeBinary)
    timestamp: Mapped[int] = mapped_column(UInt)
    signature: Mapped[bytes] = mapped_column(LargeBinary(65))
    epoch_number: Mapped[int | None] = mapped_column(ForeignKey("epochs.number"), index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # the receipt's client's countersignature (eip712.countersign_receipt): the client accepted this work
    client_signature: Mapped[bytes | None] = mapped_column(LargeBinary(65))
    # as the node's work (``Node.work_*``, ``WorkStatus``): None until countersigned
    work: Mapped[str | None] = mapped_column(String(10))


class Conflict(Base):
    """Two receipts a node signed for the same work with different outputs: slashing evidence."""

    __tablename__ = "conflicts"
    __table_args__ = (UniqueConstraint("receipt_id", "other_leaf", name="uq_conflicts_pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(42), index=True)
    receipt_id: Mapped[int] = mapped_column(ForeignKey("receipts.id"))
    other_leaf: Mapped[bytes] = mapped_column(LargeBinary(32))
    other_receipt: Mapped[str] = mapped_column(Text)  # JSON of the second signed receipt
    detected_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending / slashed / failed
    slash_tx_hash: Mapped[str | None] = mapped_column(String(66))
    last_error: Mapped[str | None] = mapped_column(Text)


class Voucher(Base):
    """The latest voucher per channel (client, node, partner, channel id); ``settled_amount`` is what the chain has
    paid on it."""

    __tablename__ = "vouchers"
    __table_args__ = (UniqueConstraint("client", "node", "partner", "channel_id", name="uq_vouchers_channel"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client: Mapped[str] = mapped_column(String(42))
    node: Mapped[str] = mapped_column(String(42), index=True)
    partner: Mapped[str] = mapped_column(String(42))  # the node whose channel shares the slot (often the node)
    channel_id: Mapped[int] = mapped_column(UInt)
    cumulative_amount: Mapped[int] = mapped_column(UInt)
    signature: Mapped[bytes] = mapped_column(LargeBinary(65))
    settled_amount: Mapped[int] = mapped_column(UInt, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class SettlementStatus:
    PREPARED = "prepared"  # items fixed, nothing sent (or a send may have been interrupted: check chain.paid)
    SENT = "sent"  # transaction hash known, receipt not yet recorded
    CONFIRMED = "confirmed"  # mined and recorded
    FAILED = "failed"  # reverted for a reason that retrying cannot fix; see last_error


class Settlement(Base):
    """One settle() transaction of an epoch."""

    __tablename__ = "settlements"
    __table_args__ = (UniqueConstraint("epoch_number", "batch_index", name="uq_settlements_batch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    epoch_number: Mapped[int] = mapped_column(ForeignKey("epochs.number"), index=True)
    batch_index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(20), default=SettlementStatus.PREPARED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    tx_hash: Mapped[str | None] = mapped_column(String(66))
    gas_used: Mapped[int | None] = mapped_column(Integer)
    block_number: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)


class SettlementItem(Base):
    __tablename__ = "settlement_items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    settlement_id: Mapped[int] = mapped_column(ForeignKey("settlements.id"), index=True)
    voucher_id: Mapped[int] = mapped_column(ForeignKey("vouchers.id"))
    client: Mapped[str] = mapped_column(String(42))
    node: Mapped[str] = mapped_column(String(42), index=True)
    partner: Mapped[str] = mapped_column(String(42))
    channel_id: Mapped[int] = mapped_column(UInt)
    cumulative_amount: Mapped[int] = mapped_column(UInt)
    signature: Mapped[bytes] = mapped_column(LargeBinary(65))
    paid_before: Mapped[int] = mapped_column(UInt)  # settled_amount when the batch was prepared
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending / paid / skipped


class SpotCheck(Base):
    __tablename__ = "spot_checks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    receipt_id: Mapped[int] = mapped_column(ForeignKey("receipts.id"), unique=True)
    epoch_number: Mapped[int] = mapped_column(Integer, index=True)
    node: Mapped[str] = mapped_column(String(42), index=True)
    status: Mapped[str] = mapped_column(String(20), default="pending")  # pending/passed/failed/inconclusive/error
    executions: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str | None] = mapped_column(Text)
    attest_tx_hash: Mapped[str | None] = mapped_column(String(66))
    # failed checks only: unattested (retry the attestation) / attested (dispute window running) / slashed / closed
    slash_status: Mapped[str | None] = mapped_column(String(20), index=True)
    slash_tx_hash: Mapped[str | None] = mapped_column(String(66))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Node(Base):
    """Per-node counters the reputation score is computed from (updated in the same transaction as their cause)."""

    __tablename__ = "nodes"

    address: Mapped[str] = mapped_column(String(42), primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    receipts_count: Mapped[int] = mapped_column(Integer, default=0)  # receipts stored (claims and evidence)
    earned_amount: Mapped[int] = mapped_column(UInt, default=0)  # sum of stored receipts' amounts (claimed)
    # work that cannot be forged (docs/economics.md, "Reputation inputs"): receipts with ``Receipt.work == "counted"``
    work_steps: Mapped[int] = mapped_column(Integer, default=0)
    work_amount: Mapped[int] = mapped_column(UInt, default=0)
    settled_amount: Mapped[int] = mapped_column(UInt, default=0)  # gross voucher amounts paid on chain
    conflicts: Mapped[int] = mapped_column(Integer, default=0)
    spot_passed: Mapped[int] = mapped_column(Integer, default=0)
    spot_failed: Mapped[int] = mapped_column(Integer, default=0)
    slashes: Mapped[int] = mapped_column(Integer, default=0)
    stake: Mapped[int] = mapped_column(UInt, default=0)
    uptime_ok: Mapped[int] = mapped_column(Integer, default=0)
    uptime_checks: Mapped[int] = mapped_column(Integer, default=0)
    successes: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float | None] = mapped_column(Float)  # exponentially weighted mean of client reports
    throughput: Mapped[float | None] = mapped_column(Float)  # tokens/s, exponentially weighted


class ClientNode(Base):
    """What one client has backed, accepted and reported of one node: the budget its countersigned receipts count
    against and the state of its reports (replay nonce, rate bucket). Bounded: at most ``max_clients_per_node`` rows
    per node and ``max_nodes_per_client`` per client (the least backed row gives way)."""

    __tablename__ = "client_nodes"
    __table_args__ = (UniqueConstraint("client", "node", name="uq_client_nodes_pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    client: Mapped[str] = mapped_column(String(42), index=True)
    node: Mapped[str] = mapped_column(String(42), index=True)
    countersigned_steps: Mapped[int] = mapped_column(Integer, default=0)
    countersigned_amount: Mapped[int] = mapped_column(UInt, default=0)
    counted_steps: Mapped[int] = mapped_column(Integer, default=0)
    counted_amount: Mapped[int] = mapped_column(UInt, default=0)  # at most the backing known when each was counted
    # settled + reserve - pending release at the last chain read (the Backing of ledger_api); settling moves reserve
    # into settled, so the sum holds until the client adds or releases reserve
    backed: Mapped[int] = mapped_column(UInt, default=0)
    backed_read_at: Mapped[float] = mapped_column(Float, default=0.0)  # unix time of that read (0: never)
    report_nonce: Mapped[int] = mapped_column(UInt, default=0)  # the highest report nonce accepted
    report_tokens: Mapped[float] = mapped_column(Float, default=0.0)  # the report rate bucket
    report_at: Mapped[float] = mapped_column(Float, default=0.0)  # when the bucket was last filled
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class PooledAudit(Base):
    """The pooled (sequential) audit test's state for one node and precision (dtype and quantization): a one-sided
    CUSUM over the scores of its audited steps (``nectar.wire.fingerprints.cusum_step``) and the receipts of the
    current run of excess, cited when it convicts. Bounded: one row per node and precision (three dtypes) and at most
    ``POOLED_WINDOW`` receipts in ``window``."""

    __tablename__ = "pooled_audits"
    __table_args__ = (UniqueConstraint("node", "descriptor", name="uq_pooled_audits_node_descriptor"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node: Mapped[str] = mapped_column(String(42), index=True)
    descriptor: Mapped[bytes] = mapped_column(LargeBinary(8))  # the receipts' precision (descriptor, device class 0)
    statistic: Mapped[float] = mapped_column(Float, default=0.0)  # the CUSUM
    steps: Mapped[int] = mapped_column(Integer, default=0)  # audited steps scored
    last_receipt_id: Mapped[int] = mapped_column(Integer, default=0)  # scores count once, in receipt order
    window: Mapped[str] = mapped_column(Text, default="[]")  # JSON [[receipt leaf hex, score], ...] of this run
    convictions: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


__all__ = [
    "Base",
    "PooledAudit",
    "ClientNode",
    "Epoch",
    "EpochStatus",
    "Receipt",
    "WorkStatus",
    "Conflict",
    "Voucher",
    "Settlement",
    "SettlementStatus",
    "SettlementItem",
    "SpotCheck",
    "Node",
    "UInt",
    "utcnow",
]
