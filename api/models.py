"""Database tables of the API gateway (SQLAlchemy 2): accounts and keys, the credit book (holds, usage, deposits),
uploaded files, fine-tuning jobs and their results, and the chain events the monitor charts.

Balances are micro-credits in 64-bit integers, so debits are single conditional UPDATEs on every backend; on-chain
amounts (credit wei, up to 2**256) are decimal strings (``UInt``).
"""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
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


class Account(Base):
    """Who pays. ``balance`` is spendable, ``held`` is reserved by requests in flight; neither can go negative."""

    __tablename__ = "api_accounts"
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_not_negative"),
        CheckConstraint("held >= 0", name="held_not_negative"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    eth_address: Mapped[str | None] = mapped_column(String(42), unique=True)  # deposits from it fund this account
    balance: Mapped[int] = mapped_column(BigInteger, default=0)  # micro-credits
    held: Mapped[int] = mapped_column(BigInteger, default=0)  # micro-credits
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """An API key; only its SHA-256 is stored (keys are 256-bit random, so a fast hash is enough)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("api_accounts.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart in listings
    name: Mapped[str] = mapped_column(String(120), default="")
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)  # None: the gateway's default
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Hold(Base):
    """Credit reserved for one request or job until its real cost is known (then charged and released)."""

    __tablename__ = "api_holds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("api_accounts.id"), index=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    reference: Mapped[str] = mapped_column(String(80))  # request id or fine-tuning job id
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Usage(Base):
    """One metered request or job: what it used and what it cost (the account's spending history)."""

    __tablename__ = "api_usage"
    __table_args__ = (Index("ix_api_usage_account_created", "account_id", "created_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("api_accounts.id"))
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    reference: Mapped[str] = mapped_column(String(80), unique=True)  # request id or job id: charged once
    kind: Mapped[str] = mapped_column(String(20))  # completion / chat / fine_tune
    model: Mapped[str] = mapped_column(String(200))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cost: Mapped[int] = mapped_column(BigInteger, default=0)  # micro-credits
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Deposit(Base):
    """Credit added to an account: an on-chain deposit to the gateway's escrow, a devnet faucet or an admin grant."""

    __tablename__ = "api_deposits"
    __table_args__ = (UniqueConstraint("tx_hash", "log_index", name="uq_api_deposits_event"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int | None] = mapped_column(ForeignKey("api_accounts.id"), index=True)  # None: unclaimed
    source: Mapped[str] = mapped_column(String(20))  # chain / faucet / grant
    depositor: Mapped[str | None] = mapped_column(String(42))
    tx_hash: Mapped[str | None] = mapped_column(String(66))
    log_index: Mapped[int | None] = mapped_column(Integer)
    block_number: Mapped[int | None] = mapped_column(Integer)
    amount_wei: Mapped[int] = mapped_column(UInt, default=0)
    amount: Mapped[int] = mapped_column(BigInteger)  # micro-credits credited
    note: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ChainCursor(Base):
    """The next block to scan, per event stream the API watches."""

    __tablename__ = "api_chain_cursors"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    chain_id: Mapped[int] = mapped_column(Integer)
    escrow: Mapped[str] = mapped_column(String(42))  # a new deployment restarts the scan
    next_block: Mapped[int] = mapped_column(Integer, default=0)


class GatewayValue(Base):
    """One value of this deployment, shared by all its processes and kept across restarts (the gateway's id)."""

    __tablename__ = "api_gateway_values"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SettledBatch(Base):
    """A ``BatchSettled`` event of the Settlement contract (any submitter), for the monitor's chart."""

    __tablename__ = "api_settled_batches"
    __table_args__ = (UniqueConstraint("tx_hash", "log_index", name="uq_api_settled_batches_event"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tx_hash: Mapped[str] = mapped_column(String(66))
    log_index: Mapped[int] = mapped_column(Integer)
    block_number: Mapped[int] = mapped_column(Integer)
    settled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    gross_wei: Mapped[int] = mapped_column(UInt)
    fee_wei: Mapped[int] = mapped_column(UInt)
    vouchers: Mapped[int] = mapped_column(Integer)


class File(Base):
    """An uploaded file (``purpose="fine-tune"`` JSONL); small, so its bytes live in the database."""

    __tablename__ = "api_files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("api_accounts.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40))
    size: Mapped[int] = mapped_column(Integer)  # bytes
    content: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobStatus:
    VALIDATING = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    FINAL = (SUCCEEDED, FAILED, CANCELLED)


class FineTuningJob(Base):
    __tablename__ = "api_fine_tuning_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("api_accounts.id"), index=True)
    model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(ForeignKey("api_files.id"))
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.QUEUED)
    hyperparameters: Mapped[str] = mapped_column(Text)  # JSON: n_epochs, batch_size, learning_rate_multiplier, ...
    suffix: Mapped[str | None] = mapped_column(String(64))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(255))
    trained_tokens: Mapped[int] = mapped_column(Integer, default=0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)  # JSON: {"code", "message", "param"}
    hold_id: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class FineTuningEvent(Base):
    __tablename__ = "api_fine_tuning_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("api_fine_tuning_jobs.id"), index=True)
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[str | None] = mapped_column(Text)  # JSON (step metrics)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TunedModel(Base):
    """Trained soft prompts, usable by name as a model in completions (by the account that trained them)."""

    __tablename__ = "api_tuned_models"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("api_accounts.id"), index=True)
    job_id: Mapped[str] = mapped_column(String(40))
    base_model: Mapped[str] = mapped_column(String(200))
    tuning_mode: Mapped[str] = mapped_column(String(20))
    pre_seq_len: Mapped[int] = mapped_column(Integer)
    prompts: Mapped[bytes] = mapped_column(LargeBinary)  # torch.save of DistributedModelForCausalLM.save_prompts
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


__all__ = [
    "Base",
    "Account",
    "ApiKey",
    "Hold",
    "Usage",
    "Deposit",
    "ChainCursor",
    "GatewayValue",
    "SettledBatch",
    "File",
    "JobStatus",
    "FineTuningJob",
    "FineTuningEvent",
    "TunedModel",
    "UInt",
    "utcnow",
]
