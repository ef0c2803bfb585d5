"""Programmatic access to the ledger's Alembic migrations (the service and the worker upgrade on start).

``nectar ledger`` and ``nectar worker`` both upgrade on start, often at the same moment on a fresh database; two
Alembic runs that both see an empty version table would both create the tables ("table epochs already exists").
``upgrade_to_head`` therefore holds a lock around the upgrade: a PostgreSQL advisory lock (it also serializes
processes on other machines), or a file lock next to a SQLite database file.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic.config import Config
from filelock import FileLock, Timeout
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
# any fixed 64-bit number; every ledger process on one PostgreSQL database takes the same advisory lock
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"nectar-ledger-migrations").digest()[:8], "big", signed=True)


def alembic_config(database_url: str) -> Config:
    config = Config(str(PACKAGE_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(PACKAGE_DIR / "alembic"))
    config.attributes["database_url"] = database_url
    return config


def _lock_file_for(database_url: str) -> Path:
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        database = Path(url.database).expanduser().resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        return database.with_name(database.name + ".migrate.lock")
    digest = hashlib.sha256(database_url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"nectar-ledger-migrate-{digest}.lock"


@contextmanager
def migration_lock(database_url: str, *, timeout: float = 300.0) -> Iterator[None]:
    """Only one process at a time migrates a given database; the others wait, then find it at head."""
    began = time.monotonic()
    if make_url(database_url).get_backend_name() == "postgresql":
        engine = create_engine(database_url, poolclass=NullPool)
        try:
            with engine.connect() as connection:
                connection.execute(text("SET lock_timeout = :ms"), {"ms": f"{int(timeout * 1000)}ms"})
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY})
                connection.commit()
                _log_wait(began)
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY})
                    connection.commit()
        finally:
            engine.dispose()
        return
    path = _lock_file_for(database_url)
    try:
        with FileLock(str(path), timeout=timeout):
            _log_wait(began)
            yield
    except Timeout:
        raise RuntimeError(f"another process has been migrating {database_url.split('@')[-1]} for over {timeout:.0f}s "
                           f"(lock file {path}); if none is running, delete the lock file and start again") from None


def _log_wait(began: float) -> None:
    waited = time.monotonic() - began
    if waited > 1.0:
        logger.info(f"Waited {waited:.1f}s for another process to finish migrating the ledger database")


def upgrade_to_head(database_url: str, *, timeout: float = 300.0) -> None:
    """Bring the schema to the latest revision, serialized against every other process doing the same."""
    from alembic import command

    with migration_lock(database_url, timeout=timeout):
        command.upgrade(alembic_config(database_url), "head")
