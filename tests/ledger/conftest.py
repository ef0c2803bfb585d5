"""Ledger fixtures: a fresh database per test module on SQLite and on PostgreSQL, the app, child-process reaping."""
from __future__ import annotations

import os

import pytest
from fastapi.testclient import TestClient

from nectar.ledger.core.config import Settings
from tests.ledger.utils import fresh_postgres_url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database_url(request, tmp_path_factory):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('ledgerdb') / 'ledger.db'}"
        return
    url, drop = fresh_postgres_url("ledger_test")
    yield url
    from nectar.ledger.core.db import get_engine

    get_engine(url).dispose()
    drop()


@pytest.fixture(scope="module")
def ledger_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("nectar-home")
    old = {k: os.environ.get(k) for k in ("NECTAR_HOME", "NECTAR_DEPLOYMENT")}
    os.environ["NECTAR_HOME"] = str(home)
    os.environ["NECTAR_DEPLOYMENT"] = str(home / "deployment.json")
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def settings(database_url, ledger_home) -> Settings:
    return Settings(database_url=database_url, broker_url=f"sqla+sqlite:///{ledger_home / 'broker.db'}",
                    deployment_path=ledger_home / "deployment.json")  # fmt: skip


@pytest.fixture(scope="module")
def api(settings):
    from nectar.ledger.service import create_app

    with TestClient(create_app(settings)) as client:
        yield client

