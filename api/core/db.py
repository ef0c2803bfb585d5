"""The API's database engine, sessions and migrations.

The engine comes from the ledger's ``make_engine`` (one home for the SQLite pragmas: WAL, busy timeout, and
``BEGIN IMMEDIATE`` so a read-then-write transaction holds the write lock from its start).
"""
from __future__ import annotations

import logging

from nectar.ledger.core.db import get_engine, session_scope  # one engine cache and transaction scope for both

logger = logging.getLogger(__name__)

__all__ = ["get_engine", "run_migrations", "session_scope"]


def run_migrations(database_url: str) -> None:
    """Bring the API's tables to the latest Alembic revision (the API and its worker call this on start)."""
    from alembic import command

    from nectar.api.migrations import alembic_config
    from nectar.ledger.migrations import migration_lock

    with migration_lock(database_url):  # the API and its worker start together: one migrates, the other waits
        command.upgrade(alembic_config(database_url), "head")
