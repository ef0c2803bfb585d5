"""The ledger's Alembic history (``alembic/``; version table ``alembic_version``). The service and the worker call
``run_migrations`` on start; ``nectar.service.migrations`` serializes them."""

from __future__ import annotations

from pathlib import Path

from nectar.service.migrations import Migrations

MIGRATIONS = Migrations(Path(__file__).resolve().parent)


def run_migrations(database_url: str) -> None:
    """Bring the ledger's tables to the latest revision."""
    MIGRATIONS.upgrade(database_url)
