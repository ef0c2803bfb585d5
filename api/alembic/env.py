"""Alembic environment of the API: URL from the caller (``MIGRATIONS.config``) or Settings, metadata from the
models, and its own version table (``alembic_version_api``) so it can share a database with the ledger."""

from nectar.api.core.config import get_settings
from nectar.api.migrations import MIGRATIONS
from nectar.api.models import Base
from nectar.service.migrations import run_env

run_env(MIGRATIONS, Base.metadata, default_url=lambda: get_settings().database_url)
