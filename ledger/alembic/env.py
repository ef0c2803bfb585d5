"""Alembic environment of the ledger: URL from the caller (``MIGRATIONS.config``) or Settings, metadata from the
models."""

from nectar.ledger.core.config import get_settings
from nectar.ledger.migrations import MIGRATIONS
from nectar.ledger.models import Base
from nectar.service.migrations import run_env

run_env(MIGRATIONS, Base.metadata, default_url=lambda: get_settings().database_url)
