"""The shared service kit: both services' Settings refuse devnet secrets outside a devnet, the signing domain comes
from the settings' deployment file (not the environment), and the ledger's and the API's migrations share one
database (SQLite and PostgreSQL) without touching each other's tables."""

from __future__ import annotations

import json

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from nectar.api import models as api_models
from nectar.api.core.config import Settings as ApiSettings
from nectar.api.migrations import MIGRATIONS as API_MIGRATIONS
from nectar.api.migrations import run_migrations as migrate_api
from nectar.ledger import models as ledger_models
from nectar.ledger.core.config import Settings as LedgerSettings
from nectar.ledger.migrations import MIGRATIONS as LEDGER_MIGRATIONS
from nectar.ledger.migrations import run_migrations as migrate_ledger
from tests.ledger.utils import fresh_postgres_url

OWN_KEY = "0x" + "5a" * 32  # not a devnet account
LEDGER_OK = dict(
    environment="production", admin_token="a", spot_check_secret="s", operator_key=OWN_KEY, verifier_key=OWN_KEY
)
API_OK = dict(environment="production", admin_token="a", private_key=OWN_KEY)


@pytest.mark.parametrize(
    ("cls", "good", "field", "bad"),
    [
        (LedgerSettings, LEDGER_OK, "admin_token", "nectar-devnet-admin"),
        (LedgerSettings, LEDGER_OK, "spot_check_secret", "nectar-devnet-spot-check-secret"),
        (LedgerSettings, LEDGER_OK, "operator_key", None),
        (LedgerSettings, LEDGER_OK, "verifier_key", "devnet"),
        (ApiSettings, API_OK, "admin_token", "nectar-devnet-api-admin"),
        (ApiSettings, API_OK, "private_key", None),
        (ApiSettings, API_OK, "private_key", "devnet"),
    ],
)
def test_production_refuses_each_devnet_secret(cls, good, field, bad):
    if bad == "devnet":
        from nectar.chain.accounts import dev_accounts

        bad = dev_accounts()[0].private_key
    assert cls(**good).environment == "production"
    with pytest.raises(ValueError, match=cls(**good).env_name(field)):
        cls(**{**good, field: bad})
    assert cls(**{**good, field: bad, "environment": "devnet"}).environment == "devnet"


def test_signing_domain_is_read_from_the_settings_deployment_file(tmp_path, monkeypatch):
    deployment = tmp_path / "deployment.json"
    settlement = "0x" + "ab" * 20
    deployment.write_text(json.dumps({"chainId": 777, "contracts": {"Settlement": {"address": settlement}}}))
    monkeypatch.setenv("NECTAR_DEPLOYMENT", str(tmp_path / "elsewhere.json"))
    domain = ApiSettings(deployment_path=deployment).signing_domain()
    assert (domain["chainId"], domain["verifyingContract"].lower()) == (777, settlement)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    url, drop = fresh_postgres_url("service_shared")
    yield url
    drop()


def test_ledger_and_api_migrate_one_database_side_by_side(shared_url):
    migrate_ledger(shared_url)
    migrate_api(shared_url)
    migrate_ledger(shared_url)  # at head: a no-op that must not see the API's tables as its own
    engine = create_engine(shared_url)
    try:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            assert {"alembic_version", "alembic_version_api", "epochs", "api_accounts"} <= tables
            for migrations, metadata in (
                (LEDGER_MIGRATIONS, ledger_models.Base.metadata),
                (API_MIGRATIONS, api_models.Base.metadata),
            ):
                version = connection.execute(text(f"SELECT version_num FROM {migrations.version_table}")).scalar()
                assert version is not None
                opts = {"compare_type": True, "include_object": migrations.owns}
                diff = compare_metadata(MigrationContext.configure(connection, opts=opts), metadata)
                assert [d for d in diff if "alembic_version" not in str(d)] == []
    finally:
        engine.dispose()
