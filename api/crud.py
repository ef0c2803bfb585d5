"""Database operations of the API: keyword-only functions that take a session and never commit it themselves.

Credit moves only through conditional UPDATEs (``balance >= amount`` in the WHERE clause), which are atomic on SQLite
(the write lock is taken at BEGIN) and on PostgreSQL (the row lock re-checks the condition), so concurrent requests
can never overdraw an account; the CHECK constraints on the table are a second line of defence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from nectar.api.models import (
    Account,
    ApiKey,
    ChainCursor,
    Deposit,
    File,
    FineTuningEvent,
    FineTuningJob,
    GatewayValue,
    Hold,
    SettledBatch,
    TunedModel,
    Usage,
    utcnow,
)

logger = logging.getLogger(__name__)

KEY_PREFIX = "nk-"


# ---------------------------------------------------------------------------------------------------- accounts, keys
def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_account(session: Session, *, name: str, eth_address: str | None = None) -> Account:
    account = Account(name=name, eth_address=eth_address, balance=0, held=0)
    session.add(account)
    session.flush()
    return account


def get_account(session: Session, *, account_id: int) -> Account | None:
    return session.get(Account, account_id)


def account_by_address(session: Session, *, address: str) -> Account | None:
    return session.scalar(select(Account).where(Account.eth_address == address))


def set_eth_address(session: Session, *, account_id: int, address: str | None) -> Account:
    account = session.get(Account, account_id)
    account.eth_address = address
    session.flush()
    return account


def create_api_key(
    session: Session, *, account_id: int, name: str = "", rate_limit_per_minute: int | None = None
) -> tuple[ApiKey, str]:
    """A new key for the account; returns (row, plaintext). The plaintext is never stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        account_id=account_id,
        key_hash=hash_key(plaintext),
        prefix=plaintext[:10],
        name=name,
        rate_limit_per_minute=rate_limit_per_minute,
    )
    session.add(row)
    session.flush()
    return row, plaintext


def key_by_plaintext(session: Session, *, key: str) -> ApiKey | None:
    """The live (not revoked) key with this plaintext, or None."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))


def count_live_keys(session: Session, *, account_id: int, lock: bool = False) -> int:
    """Unrevoked keys of the account. ``lock``: first lock the account's row until the transaction ends, so concurrent
    key creations count one after another (PostgreSQL; SQLite transactions begin IMMEDIATE and are serial already)."""
    if lock:
        session.execute(select(Account.id).where(Account.id == account_id).with_for_update())
    query = select(func.count()).select_from(ApiKey)
    return session.scalar(query.where(ApiKey.account_id == account_id, ApiKey.revoked_at.is_(None))) or 0


def list_api_keys(session: Session, *, account_id: int) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).where(ApiKey.account_id == account_id).order_by(ApiKey.id)))


def revoke_api_key(session: Session, *, account_id: int, key_id: int) -> ApiKey | None:
    row = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.account_id == account_id))
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


# ---------------------------------------------------------------------------------------------------- credit
def place_hold(session: Session, *, account_id: int, amount: int, reference: str) -> Hold | None:
    """Move ``amount`` from balance to held if the balance covers it; None (nothing changed) if it does not."""
    if amount < 0:
        raise ValueError(f"a hold must be >= 0, got {amount}")
    moved = session.execute(
        update(Account)
        .where(Account.id == account_id, Account.balance >= amount)
        .values(balance=Account.balance - amount, held=Account.held + amount)
    ).rowcount
    if moved != 1:
        return None
    hold = Hold(account_id=account_id, amount=amount, reference=reference)
    session.add(hold)
    session.flush()
    return hold


def settle_hold(
    session: Session,
    *,
    hold_id: int,
    cost: int,
    kind: str,
    model: str,
    key_id: int | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
) -> Usage | None:
    """Charge ``cost`` (at most the hold) and return the rest of the hold to the balance, with a usage row.

    The hold row is claimed by deleting it, so a second settlement of the same hold does nothing (returns None)."""
    hold = session.get(Hold, hold_id)
    if hold is None or session.execute(delete(Hold).where(Hold.id == hold_id)).rowcount != 1:
        return None
    if cost > hold.amount:  # holds are sized for the worst case; log loudly if that assumption ever breaks
        logger.error(f"Cost {cost} above hold {hold.amount} for {hold.reference}; charging the hold only")
        cost = hold.amount
    session.execute(
        update(Account)
        .where(Account.id == hold.account_id)
        .values(held=Account.held - hold.amount, balance=Account.balance + (hold.amount - cost))
    )
    usage = Usage(
        account_id=hold.account_id,
        key_id=key_id,
        reference=hold.reference,
        kind=kind,
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost=cost,
    )
    session.add(usage)
    session.flush()
    return usage


def release_stale_holds(session: Session, *, older_than: timedelta) -> int:
    """Return holds left by crashed requests to their accounts (uncharged: the work's result was never delivered).
    Holds of fine-tuning jobs still queued or running are kept: the worker settles them however long they take."""
    active_jobs = select(FineTuningJob.id).where(FineTuningJob.status.in_(["queued", "running"]))
    stale = list(
        session.scalars(select(Hold).where(Hold.created_at < utcnow() - older_than, Hold.reference.not_in(active_jobs)))
    )
    released = 0
    for hold in stale:
        if session.execute(delete(Hold).where(Hold.id == hold.id)).rowcount == 1:
            session.execute(
                update(Account)
                .where(Account.id == hold.account_id)
                .values(held=Account.held - hold.amount, balance=Account.balance + hold.amount)
            )
            released += 1
            logger.warning(
                f"Released stale hold {hold.id} ({hold.reference}) of {hold.amount} to account {hold.account_id}"
            )
    return released


def add_credit(
    session: Session,
    *,
    account_id: int | None,
    amount: int,
    source: str,
    depositor: str | None = None,
    tx_hash: str | None = None,
    log_index: int | None = None,
    block_number: int | None = None,
    amount_wei: int = 0,
    note: str = "",
) -> Deposit | None:
    """Record a deposit and credit it (if it names an account). None if this chain event was already recorded."""
    deposit = Deposit(
        account_id=account_id,
        source=source,
        depositor=depositor,
        tx_hash=tx_hash,
        log_index=log_index,
        block_number=block_number,
        amount_wei=amount_wei,
        amount=amount,
        note=note,
    )
    try:
        with session.begin_nested():
            session.add(deposit)
            session.flush()
    except IntegrityError:
        return None
    if account_id is not None and amount:
        session.execute(update(Account).where(Account.id == account_id).values(balance=Account.balance + amount))
    return deposit


def claim_unassigned_deposits(session: Session, *, account_id: int, address: str) -> int:
    """Credit chain deposits that arrived from ``address`` before it was linked to an account; returns the amount."""
    rows = list(session.scalars(select(Deposit).where(Deposit.account_id.is_(None), Deposit.depositor == address)))
    total = 0
    for row in rows:
        claimed = session.execute(
            update(Deposit).where(Deposit.id == row.id, Deposit.account_id.is_(None)).values(account_id=account_id)
        ).rowcount
        if claimed:
            total += row.amount
    if total:
        session.execute(update(Account).where(Account.id == account_id).values(balance=Account.balance + total))
    return total


def list_deposits(session: Session, *, account_id: int, limit: int = 100) -> list[Deposit]:
    return list(
        session.scalars(
            select(Deposit).where(Deposit.account_id == account_id).order_by(Deposit.id.desc()).limit(limit)
        )
    )


def list_usage(session: Session, *, account_id: int, limit: int = 100) -> list[Usage]:
    return list(
        session.scalars(select(Usage).where(Usage.account_id == account_id).order_by(Usage.id.desc()).limit(limit))
    )


def usage_totals(session: Session, *, account_id: int) -> tuple[int, int, int]:
    """(requests, tokens, cost) over the account's whole history."""
    row = session.execute(
        select(
            func.count(Usage.id),
            func.coalesce(func.sum(Usage.prompt_tokens + Usage.completion_tokens), 0),
            func.coalesce(func.sum(Usage.cost), 0),
        ).where(Usage.account_id == account_id)
    ).one()
    return int(row[0]), int(row[1]), int(row[2])


def usage_since(session: Session, *, since: datetime) -> list[tuple[datetime, int, int]]:
    """(time, tokens, cost) of every usage row since ``since`` (the monitor buckets them)."""
    rows = session.execute(
        select(Usage.created_at, Usage.prompt_tokens + Usage.completion_tokens, Usage.cost)
        .where(Usage.created_at >= since)
        .order_by(Usage.created_at)
    )
    return [(t, int(tokens), int(cost)) for t, tokens, cost in rows]


def settled_since(session: Session, *, since: datetime) -> list[SettledBatch]:
    return list(
        session.scalars(select(SettledBatch).where(SettledBatch.settled_at >= since).order_by(SettledBatch.settled_at))
    )


def record_settled_batch(
    session: Session,
    *,
    tx_hash: str,
    log_index: int,
    block_number: int,
    settled_at: datetime,
    gross_wei: int,
    fee_wei: int,
    vouchers: int,
) -> bool:
    row = SettledBatch(
        tx_hash=tx_hash,
        log_index=log_index,
        block_number=block_number,
        settled_at=settled_at,
        gross_wei=gross_wei,
        fee_wei=fee_wei,
        vouchers=vouchers,
    )
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------- chain cursors
def get_cursor(session: Session, *, name: str, chain_id: int, escrow: str, start_block: int) -> ChainCursor:
    """The scan position of one event stream; reset when the deployment changed (a new devnet)."""
    cursor = session.get(ChainCursor, name)
    if cursor is None:
        cursor = ChainCursor(name=name, chain_id=chain_id, escrow=escrow, next_block=start_block)
        session.add(cursor)
        session.flush()
    elif (cursor.chain_id, cursor.escrow) != (chain_id, escrow):
        logger.info(f"New deployment (chain {chain_id}, escrow {escrow}): rescanning {name} from {start_block}")
        cursor.chain_id, cursor.escrow, cursor.next_block = chain_id, escrow, start_block
    return cursor


# ---------------------------------------------------------------------------------------------------- gateway id
GATEWAY_ID = "gateway_id"


def gateway_id(session: Session) -> str:
    """This deployment's id (32 hex digits), made on first use: operators' signed requests name it, so a request
    signed for one gateway is refused by every other (``nectar.wire.request_auth``)."""
    row = session.get(GatewayValue, GATEWAY_ID)
    if row is not None:
        return row.value
    try:
        with session.begin_nested():  # two processes of a new deployment may race here: the first one's id wins
            session.add(GatewayValue(name=GATEWAY_ID, value=secrets.token_hex(16)))
            session.flush()
    except IntegrityError:
        pass
    return session.execute(select(GatewayValue.value).where(GatewayValue.name == GATEWAY_ID)).scalar_one()


# ---------------------------------------------------------------------------------------------------- files
def create_file(session: Session, *, account_id: int, filename: str, purpose: str, content: bytes) -> File:
    row = File(
        id="file-" + secrets.token_hex(12),
        account_id=account_id,
        filename=filename,
        purpose=purpose,
        size=len(content),
        content=content,
    )
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, *, account_id: int, file_id: str) -> File | None:
    return session.scalar(select(File).where(File.id == file_id, File.account_id == account_id))


def list_files(session: Session, *, account_id: int, purpose: str | None = None) -> list[File]:
    query = select(File).where(File.account_id == account_id).order_by(File.created_at.desc())
    return list(session.scalars(query.where(File.purpose == purpose) if purpose else query))


def delete_file(session: Session, *, account_id: int, file_id: str) -> bool:
    used = session.scalar(select(func.count(FineTuningJob.id)).where(FineTuningJob.training_file == file_id))
    if used:
        raise ValueError(f"{file_id} is the training file of {used} fine-tuning job(s) and is kept with them")
    return session.execute(delete(File).where(File.id == file_id, File.account_id == account_id)).rowcount == 1


# ---------------------------------------------------------------------------------------------------- fine-tuning
def new_job_id() -> str:
    return "ftjob-" + secrets.token_hex(12)


def create_job(
    session: Session,
    *,
    job_id: str,
    account_id: int,
    model: str,
    training_file: str,
    hyperparameters: dict,
    suffix: str | None,
    total_steps: int,
    hold_id: int | None,
) -> FineTuningJob:
    job = FineTuningJob(
        id=job_id,
        account_id=account_id,
        model=model,
        hold_id=hold_id,
        training_file=training_file,
        hyperparameters=json.dumps(hyperparameters),
        suffix=suffix,
        status="queued",
        trained_tokens=0,
        step=0,
        total_steps=total_steps,
        cancel_requested=False,
    )
    session.add(job)
    session.flush()
    return job


def claim_job(session: Session, *, job_id: str) -> FineTuningJob | None:
    """Move a queued job to running (one worker wins); a running one is returned too (a redelivery after a crash)."""
    session.execute(
        update(FineTuningJob)
        .where(FineTuningJob.id == job_id, FineTuningJob.status == "queued")
        .values(status="running", started_at=utcnow())
    )
    job = session.get(FineTuningJob, job_id)
    return job if job is not None and job.status == "running" else None


def cancel_queued_job(session: Session, *, job_id: str) -> bool:
    """Cancel a job no worker has started; False if it is already running (or over)."""
    return (
        session.execute(
            update(FineTuningJob)
            .where(FineTuningJob.id == job_id, FineTuningJob.status == "queued")
            .values(status="cancelled", finished_at=utcnow())
        ).rowcount
        == 1
    )


def get_job(session: Session, *, job_id: str, account_id: int | None = None) -> FineTuningJob | None:
    query = select(FineTuningJob).where(FineTuningJob.id == job_id)
    if account_id is not None:
        query = query.where(FineTuningJob.account_id == account_id)
    return session.scalar(query)


def list_jobs(session: Session, *, account_id: int, after: str | None = None, limit: int = 20) -> list[FineTuningJob]:
    query = select(FineTuningJob).where(FineTuningJob.account_id == account_id)
    if after:
        anchor = session.get(FineTuningJob, after)
        if anchor is not None:
            query = query.where(FineTuningJob.created_at < anchor.created_at)
    return list(session.scalars(query.order_by(FineTuningJob.created_at.desc()).limit(limit)))


def add_job_event(
    session: Session, *, job_id: str, message: str, level: str = "info", data: dict | None = None
) -> FineTuningEvent:
    event = FineTuningEvent(
        job_id=job_id, level=level, message=message, data=None if data is None else json.dumps(data)
    )
    session.add(event)
    session.flush()
    return event


def list_job_events(
    session: Session, *, job_id: str, after: int | None = None, limit: int = 20
) -> list[FineTuningEvent]:
    """Newest first (OpenAI's order); ``after`` is an event id: only older events are listed."""
    query = select(FineTuningEvent).where(FineTuningEvent.job_id == job_id)
    if after is not None:
        query = query.where(FineTuningEvent.id < after)
    return list(session.scalars(query.order_by(FineTuningEvent.id.desc()).limit(limit)))


def save_tuned_model(
    session: Session,
    *,
    name: str,
    account_id: int,
    job_id: str,
    base_model: str,
    tuning_mode: str,
    pre_seq_len: int,
    prompts: bytes,
) -> TunedModel:
    row = TunedModel(
        name=name,
        account_id=account_id,
        job_id=job_id,
        base_model=base_model,
        tuning_mode=tuning_mode,
        pre_seq_len=pre_seq_len,
        prompts=prompts,
    )
    session.merge(row)
    session.flush()
    return row


def get_tuned_model(session: Session, *, name: str) -> TunedModel | None:
    return session.get(TunedModel, name)


def list_tuned_models(session: Session, *, account_id: int) -> list[TunedModel]:
    return list(
        session.scalars(select(TunedModel).where(TunedModel.account_id == account_id).order_by(TunedModel.created_at))
    )


def delete_tuned_model(session: Session, *, account_id: int, name: str) -> bool:
    return (
        session.execute(delete(TunedModel).where(TunedModel.name == name, TunedModel.account_id == account_id)).rowcount
        == 1
    )
