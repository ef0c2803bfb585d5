"""Alembic environment: URL from the caller (``migrations.alembic_config``) or Settings, metadata from the models."""
from alembic import context
from sqlalchemy import engine_from_config, pool

from nectar.ledger.core.config import get_settings
from nectar.ledger.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True,
                      render_as_batch=database_url().startswith("sqlite"))  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    section = config.get_section(config.config_ini_section) or {}
    section["sqlalchemy.url"] = database_url()
    # a busy SQLite file (the service or worker writing) makes DDL wait instead of failing at once
    extra = {"connect_args": {"timeout": 30}} if section["sqlalchemy.url"].startswith("sqlite") else {}
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool, **extra)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                          render_as_batch=connection.dialect.name == "sqlite")  # fmt: skip
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
