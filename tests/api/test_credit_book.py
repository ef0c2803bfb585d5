"""The credit book on SQLite and PostgreSQL, without a swarm: concurrent holds never overdraw, every settlement and
chain event counts exactly once, the database itself refuses a negative balance, keys are stored hashed, and the
Alembic migration matches the models."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import text, update
from sqlalchemy.exc import IntegrityError

from nectar.api import crud
from nectar.api.migrations import run_migrations
from nectar.api.models import Account, Base
from nectar.service.db import get_engine, session_scope
from tests.ledger.utils import fresh_postgres_url  # one home for throwaway test databases


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def engine(request, tmp_path_factory):
    if request.param == "sqlite":
        url, drop = f"sqlite:///{tmp_path_factory.mktemp('book') / 'api.db'}", None
    else:
        url, drop = fresh_postgres_url("api_book")
    run_migrations(url)
    yield get_engine(url)
    get_engine(url).dispose()
    if drop:
        drop()


def new_account(engine, balance: int) -> int:
    with session_scope(engine) as session:
        account = crud.create_account(session, name="t")
        if balance:
            crud.add_credit(session, account_id=account.id, amount=balance, source="grant")
        return account.id


def balances(engine, account_id: int) -> tuple[int, int]:
    with session_scope(engine) as session:
        account = crud.get_account(session, account_id=account_id)
        return account.balance, account.held


def test_migration_matches_the_models(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert [d for d in diff if "alembic_version" not in str(d)] == []


def test_concurrent_holds_never_overdraw(engine):
    account_id = new_account(engine, 1000)
    holds, errors = [], []
    lock = threading.Lock()

    def grab():
        try:
            while True:
                with session_scope(engine) as session:
                    hold = crud.place_hold(session, account_id=account_id, amount=70, reference=uuid.uuid4().hex)
                    if hold is None:
                        return
                    with lock:
                        holds.append(hold.id)
        except Exception as e:  # surfaced below: a busy database must not look like success
            errors.append(e)

    threads = [threading.Thread(target=grab) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(holds) == 1000 // 70
    assert balances(engine, account_id) == (1000 - 14 * 70, 14 * 70)

    costs = [i * 5 for i in range(14)]  # each request used less than its hold

    def settle(hold_id, cost):
        with session_scope(engine) as session:
            crud.settle_hold(
                session,
                hold_id=hold_id,
                cost=cost,
                kind="completion",
                model="m",
                prompt_tokens=cost,
                completion_tokens=0,
            )

    threads = [threading.Thread(target=settle, args=(h, c)) for h, c in zip(holds, costs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert balances(engine, account_id) == (1000 - sum(costs), 0)
    with session_scope(engine) as session:
        assert crud.settle_hold(session, hold_id=holds[0], cost=70, kind="completion", model="m") is None
        assert crud.usage_totals(session, account_id=account_id) == (14, sum(costs), sum(costs))
    assert balances(engine, account_id) == (1000 - sum(costs), 0)


def test_a_chain_event_is_credited_once_even_when_raced(engine):
    account_id = new_account(engine, 0)
    results = []

    def credit():
        with session_scope(engine) as session:
            results.append(
                crud.add_credit(
                    session,
                    account_id=account_id,
                    amount=500,
                    source="chain",
                    tx_hash="0x" + "ab" * 32,
                    log_index=3,
                    amount_wei=500 * 10**12,
                )
            )

    threads = [threading.Thread(target=credit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        try:
            t.join()
        except IntegrityError:
            pass
    assert sum(r is not None for r in results) == 1
    assert balances(engine, account_id) == (500, 0)


def test_the_database_refuses_a_negative_balance(engine):
    account_id = new_account(engine, 10)
    with pytest.raises(IntegrityError):
        with session_scope(engine) as session:
            session.execute(update(Account).where(Account.id == account_id).values(balance=Account.balance - 11))
    assert balances(engine, account_id) == (10, 0)


def test_stale_holds_go_back_to_the_account(engine):
    account_id = new_account(engine, 100)
    with session_scope(engine) as session:
        crud.place_hold(session, account_id=account_id, amount=60, reference="crashed-request")
    with session_scope(engine) as session:
        assert crud.release_stale_holds(session, older_than=timedelta(hours=1)) == 0
        assert crud.release_stale_holds(session, older_than=timedelta(seconds=-1)) >= 1
    assert balances(engine, account_id) == (100, 0)


def test_keys_are_stored_hashed(engine):
    account_id = new_account(engine, 0)
    with session_scope(engine) as session:
        _, plaintext = crud.create_api_key(session, account_id=account_id, name="k")
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT key_hash, prefix FROM api_keys")).all()
    assert all(plaintext not in (key_hash, prefix) and len(key_hash) == 64 for key_hash, prefix in rows)
    with session_scope(engine) as session:
        assert crud.key_by_plaintext(session, key=plaintext).account_id == account_id
        assert crud.key_by_plaintext(session, key=plaintext + "x") is None


def test_the_sweep_keeps_the_holds_of_running_jobs(engine):
    account_id = new_account(engine, 1000)
    with session_scope(engine) as session:
        file = crud.create_file(session, account_id=account_id, filename="f.jsonl", purpose="fine-tune", content=b"{}")
        job_id = crud.new_job_id()
        hold = crud.place_hold(session, account_id=account_id, amount=300, reference=job_id)
        crud.create_job(
            session,
            job_id=job_id,
            account_id=account_id,
            model="m",
            training_file=file.id,
            hyperparameters={},
            suffix=None,
            total_steps=10,
            hold_id=hold.id,
        )
        crud.claim_job(session, job_id=job_id)
    with session_scope(engine) as session:
        crud.release_stale_holds(session, older_than=timedelta(seconds=-1))
    assert balances(engine, account_id) == (700, 300)  # a long job keeps its hold
    with session_scope(engine) as session:
        crud.settle_hold(session, hold_id=hold.id, cost=120, kind="fine_tune", model="m", prompt_tokens=12)
    assert balances(engine, account_id) == (880, 0)


def test_processes_starting_together_agree_on_the_gateway_id(engine):
    """The deployment's id is made by whichever process starts first; racing first starts must not make two."""
    barrier, ids, errors = threading.Barrier(8), [], []

    def start():
        try:
            barrier.wait()
            with session_scope(engine) as session:
                ids.append(crud.gateway_id(session))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(ids) == 8 and len(set(ids)) == 1, (errors, ids)
    with session_scope(engine) as session:
        assert crud.gateway_id(session) == ids[0]
