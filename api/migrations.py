"""The API's Alembic history (``alembic/``). Its version table is ``alembic_version_api`` and its tables start with
``api_``, so they can live in the same database as the ledger's without the two histories colliding. The API and its
worker call ``run_migrations`` on start; ``nectar.service.migrations`` serializes them."""

from __future__ import annotations

from pathlib import Path

from nectar.service.migrations import Migrations

MIGRATIONS = Migrations(Path(__file__).resolve().parent, version_table="alembic_version_api")


def run_migrations(database_url: str) -> None:
    """Bring the API's tables to the latest revision."""
    MIGRATIONS.upgrade(database_url)
