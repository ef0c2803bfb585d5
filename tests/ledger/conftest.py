"""Ledger fixtures: a fresh database per test module on SQLite and on PostgreSQL, the app, a private snapshot of the
contract artifacts."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

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
    from nectar.service.db import get_engine

    get_engine(url).dispose()
    drop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    """Environment changes that last for one test module (its market's deployment file, say)."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch


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
    return Settings(
        database_url=database_url,
        broker_url=f"sqla+sqlite:///{ledger_home / 'broker.db'}",
        deployment_path=ledger_home / "deployment.json",
    )


@pytest.fixture(scope="module")
def api(settings):
    from nectar.ledger.service import create_app

    with TestClient(create_app(settings)) as client:
        yield client


def _complete_artifacts(out) -> dict | None:
    """{name: mtime} when every deployed contract's artifact is fully written (forge rewrites them in place)."""
    from nectar.chain.artifacts import ABSTRACT_NAMES, CONTRACT_NAMES

    mtimes = {}
    for name in CONTRACT_NAMES:
        path = out / f"{name}.sol" / f"{name}.json"
        try:
            data = json.loads(path.read_text())
            if name not in ABSTRACT_NAMES and not data["bytecode"]["object"].removeprefix("0x"):
                return None
            mtimes[name] = path.stat().st_mtime
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return mtimes


@pytest.fixture(scope="session", autouse=True)
def contracts_snapshot(tmp_path_factory):
    """Devnets in these tests deploy from a private copy of the forge artifacts, taken once they are complete and
    unchanged for 2s: someone rebuilding contracts/out meanwhile cannot hand a test a half-written artifact."""
    if os.environ.get("NECTAR_CONTRACTS_OUT"):
        yield Path(os.environ["NECTAR_CONTRACTS_OUT"])
        return
    from nectar.chain.artifacts import CONTRACT_NAMES, build_contracts, out_dir

    build_contracts()
    source, deadline = out_dir(), time.monotonic() + 600
    while True:
        first = _complete_artifacts(source)
        time.sleep(2)
        if first is not None and first == _complete_artifacts(source):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the forge artifacts in {source} stayed incomplete for 10 minutes; run `forge build`")
    snapshot = tmp_path_factory.mktemp("contracts-out")
    for name in CONTRACT_NAMES:
        (snapshot / f"{name}.sol").mkdir()
        shutil.copy2(source / f"{name}.sol" / f"{name}.json", snapshot / f"{name}.sol" / f"{name}.json")
    os.environ["NECTAR_CONTRACTS_OUT"] = str(snapshot)  # inherited by the ledger, worker and node subprocesses
    try:
        yield snapshot
    finally:
        os.environ.pop("NECTAR_CONTRACTS_OUT", None)
