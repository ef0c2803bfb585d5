"""Alembic for every Nectar service: ``Migrations`` names one service's history (its folder and version table),
``run_env`` is the body of each ``alembic/env.py``, and ``upgrade`` serializes upgrades on start.

A service and its worker both upgrade on start, often at the same moment on a fresh database; two Alembic runs that
both see an empty version table would both create the tables ("table epochs already exists"). ``upgrade``
therefore holds a lock around the upgrade: a PostgreSQL advisory lock (it also serializes processes on other
machines), or a file lock next to a SQLite database file. All services take the same lock, so the ledger and the
API can share one database.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alembic.config import Config
from filelock import FileLock, Timeout
from sqlalchemy import MetaData, create_engine, engine_from_config, pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

logger = logging.getLogger(__name__)

# any fixed 64-bit number, the same in every process on one PostgreSQL database (kept from when only the ledger
# migrated, so processes of older and newer versions still exclude each other)
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"nectar-ledger-migrations").digest()[:8], "big", signed=True)


@dataclass(frozen=True)
class Migrations:
    """One service's Alembic history: ``package_dir`` holds ``alembic.ini`` and ``alembic/``."""

    package_dir: Path
    version_table: str = "alembic_version"  # its own name lets two histories share one database

    def config(self, database_url: str) -> Config:
        config = Config(str(self.package_dir / "alembic.ini"))
        config.set_main_option("script_location", str(self.package_dir / "alembic"))
        config.attributes["database_url"] = database_url
        return config

    def upgrade(self, database_url: str, revision: str = "head", *, timeout: float = 300.0) -> None:
        """Bring the schema to ``revision``, serialized against every other process doing the same."""
        from alembic import command

        with migration_lock(database_url, timeout=timeout):
            command.upgrade(self.config(database_url), revision)

    @staticmethod
    def owns(obj, name, type_, reflected, compare_to) -> bool:
        """Alembic's ``include_object``: autogenerate leaves alone a table found in the database but not in the
        models, as a shared database also holds the other service's tables (write a drop by hand)."""
        return not (type_ == "table" and reflected and compare_to is None)


def run_env(migrations: Migrations, metadata: MetaData, default_url: Callable[[], str]) -> None:
    """The body of a service's ``alembic/env.py``: the URL from ``Migrations.config`` or else ``default_url()``
    (the service's Settings, for the ``alembic`` command line)."""
    from alembic import context

    config = context.config
    url = config.attributes.get("database_url") or default_url()
    options = dict(
        target_metadata=metadata,
        compare_type=True,
        version_table=migrations.version_table,
        include_object=migrations.owns,
    )
    if context.is_offline_mode():
        context.configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"), **options)
        with context.begin_transaction():
            context.run_migrations()
        return
    section = config.get_section(config.config_ini_section) or {}
    section["sqlalchemy.url"] = url
    # a busy SQLite file (the service or worker writing) makes DDL wait instead of failing at once
    extra = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool, **extra)
    with connectable.connect() as connection:
        context.configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite", **options)
        with context.begin_transaction():
            context.run_migrations()


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
        raise RuntimeError(
            f"another process has been migrating {database_url.split('@')[-1]} for over {timeout:.0f}s "
            f"(lock file {path}); if none is running, delete the lock file and start again"
        ) from None


def _log_wait(began: float) -> None:
    waited = time.monotonic() - began
    if waited > 1.0:
        logger.info(f"Waited {waited:.1f}s for another process to finish migrating the database")
