"""Programmatic access to the ledger's Alembic migrations (the service and the worker upgrade on start)."""
from __future__ import annotations

import logging
from pathlib import Path

from alembic.config import Config

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent


def alembic_config(database_url: str) -> Config:
    config = Config(str(PACKAGE_DIR / "alembic.ini"))
    config.set_main_option("script_location", str(PACKAGE_DIR / "alembic"))
    config.attributes["database_url"] = database_url
    return config
