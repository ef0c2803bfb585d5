"""The API's database engine, sessions and migrations.

The engine comes from the ledger's ``make_engine`` (one home for the SQLite pragmas: WAL, busy timeout, and
``BEGIN IMMEDIATE`` so a read-then-write transaction holds the write lock from its start).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from nectar.ledger.core.db import make_engine

logger = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def get_engine(database_url: str) -> Engine:
    return make_engine(database_url)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on error."""
    with Session(engine, expire_on_commit=False) as session:
        with session.begin():
            yield session


def run_migrations(database_url: str) -> None:
    """Bring the API's tables to the latest Alembic revision (the API and its worker call this on start)."""
    from alembic import command

    from nectar.api.migrations import alembic_config
    from nectar.ledger.migrations import migration_lock

    with migration_lock(database_url):  # the API and its worker start together: one migrates, the other waits
        command.upgrade(alembic_config(database_url), "head")
