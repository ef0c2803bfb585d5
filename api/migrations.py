"""Programmatic access to the API's Alembic migrations. Its version table is ``alembic_version_api``, so the API's
tables can live in the same database as the ledger's without the two migration histories colliding."""
from __future__ import annotations

import logging
from pathlib import Path

from alembic.config import Config

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
VERSION_TABLE = "alembic_version_api"


def alembic_config(database_url: str) -> Config:
    config = Config(str(PACKAGE_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(PACKAGE_DIR / "alembic"))
    config.attributes["database_url"] = database_url
    return config
