"""Alembic environment of the API: URL from the caller (``migrations.alembic_config``) or Settings, metadata from
the models, and its own version table (``alembic_version_api``) so it can share a database with the ledger."""
from alembic import context
from sqlalchemy import engine_from_config, pool

from nectar.api.core.config import get_settings
from nectar.api.migrations import VERSION_TABLE
from nectar.api.models import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    return config.attributes.get("database_url") or get_settings().database_url


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    # a shared database also holds the ledger's tables: autogenerate must neither drop nor diff them
    return not (type_ == "table" and reflected and compare_to is None and not name.startswith("api_"))


def run_migrations_offline() -> None:
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True, compare_type=True,
                      version_table=VERSION_TABLE, include_object=include_object,
                      render_as_batch=database_url().startswith("sqlite"))  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    section = config.get_section(config.config_ini_section) or {}
    section["sqlalchemy.url"] = database_url()
    connectable = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                          version_table=VERSION_TABLE, include_object=include_object,
                          render_as_batch=connection.dialect.name == "sqlite")  # fmt: skip
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
