"""Migrations: concurrent upgrades of one fresh database (SQLite and PostgreSQL), `nectar ledger` and `nectar worker`
started at the same moment, the schema matching the models, and the Alembic folder shipping in a built wheel."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from nectar.ledger.migrations import MIGRATIONS
from nectar.ledger.models import Base
from tests.ledger.utils import free_port, fresh_postgres_url, start_nectar, wait_for, wait_http

REPO = Path(__file__).resolve().parents[2]
PROCESSES = 4


def head_revision() -> str:
    return ScriptDirectory.from_config(MIGRATIONS.config("sqlite://")).get_current_head()


def _migrate_at_barrier(url: str, barrier, errors) -> None:
    from nectar.ledger.migrations import run_migrations

    barrier.wait()
    try:
        run_migrations(url)
    except Exception as e:  # reported to the parent: a race shows up as "table ... already exists"
        errors.put(f"{type(e).__name__}: {e}")


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    url, drop = fresh_postgres_url("ledger_migrate")
    yield url
    drop()


def test_concurrent_upgrades_of_a_fresh_database_all_succeed(fresh_url):
    context = multiprocessing.get_context("fork")
    barrier, errors = context.Barrier(PROCESSES), context.Queue()
    workers = [context.Process(target=_migrate_at_barrier, args=(fresh_url, barrier, errors)) for _ in range(PROCESSES)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert not found, found
    assert [w.exitcode for w in workers] == [0] * PROCESSES
    engine = create_engine(fresh_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [
                head_revision()
            ]
            assert {"epochs", "receipts", "spot_checks", "vouchers"} <= set(inspect(connection).get_table_names())
            # the upgraded schema is exactly what the models declare (no drift between migrations and models)
            diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
            assert diff == []
    finally:
        engine.dispose()


def test_upgrade_from_the_first_revision_keeps_rows(tmp_path):
    from alembic import command

    from nectar.ledger.migrations import run_migrations

    url = f"sqlite:///{tmp_path / 'old.db'}"
    command.upgrade(MIGRATIONS.config(url), "0001")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO epochs (number, status, opened_at, receipt_count, total_amount) "
                "VALUES (1, 'collecting', '2026-01-01', 0, '0')"
            )
        )
    run_migrations(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT number FROM epochs")).scalars().all() == [1]
        columns = {c["name"] for c in inspect(connection).get_columns("spot_checks")}
        assert {"slash_status", "slash_tx_hash"} <= columns
    engine.dispose()


def test_voucher_partner_migration_keeps_channels_and_keys_them_by_partner(fresh_url):
    """0003: existing vouchers become self-partnered channels; afterwards one (client, node, channel id) may hold a
    channel per partner, and each of those channels stays unique."""
    from alembic import command
    from sqlalchemy.exc import IntegrityError

    from nectar.ledger.migrations import run_migrations

    client, node, other = "0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20

    def insert(connection, signature: bytes, partner: str | None = None) -> None:
        columns, values = ("partner, ", ":partner, ") if partner else ("", "")
        connection.execute(
            text(
                f"INSERT INTO vouchers (client, node, {columns}channel_id, cumulative_amount, "
                f"signature, settled_amount, updated_at) VALUES (:client, :node, {values}'7', '5', "
                f":signature, '0', '2026-01-01')"
            ),
            {"client": client, "node": node, "partner": partner, "signature": signature},
        )

    command.upgrade(MIGRATIONS.config(fresh_url), "0002")
    engine = create_engine(fresh_url)
    try:
        with engine.begin() as connection:
            insert(connection, b"\1" * 65)
        run_migrations(fresh_url)
        with engine.begin() as connection:
            assert [tuple(r) for r in connection.execute(text("SELECT node, partner FROM vouchers"))] == [(node, node)]
            insert(connection, b"\2" * 65, partner=other)  # the same channel id, paired with another node
        with pytest.raises(IntegrityError):
            with engine.begin() as connection:
                insert(connection, b"\3" * 65, partner=other)
    finally:
        engine.dispose()


def test_ledger_and_worker_started_together_on_a_fresh_sqlite_database(tmp_path):
    env = {
        "NECTAR_HOME": str(tmp_path),
        "NECTAR_LEDGER_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "NECTAR_LEDGER_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        "NECTAR_LEDGER_DEPLOYMENT_PATH": str(tmp_path / "none.json"),
    }
    port = free_port()
    ledger = start_nectar("ledger", ["--port", str(port), "--log-level", "info"], env, tmp_path / "ledger.log")
    worker = start_nectar("worker", ["--log-level", "INFO", "--no-beat"], env, tmp_path / "worker.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, process=ledger)
        wait_for(
            lambda: "ready" in (tmp_path / "worker.log").read_text(errors="ignore") or worker.poll() is not None,
            120,
            "the worker to start",
        )
        logs = (tmp_path / "ledger.log").read_text(errors="ignore") + (tmp_path / "worker.log").read_text(
            errors="ignore"
        )
        assert worker.poll() is None and ledger.poll() is None, logs[-3000:]
        assert "already exists" not in logs
    finally:
        for process in (ledger, worker):
            if process.poll() is None:
                process.terminate()
                process.wait(30)


def test_a_built_wheel_ships_the_migrations_and_they_run_from_it(tmp_path):
    """A non-editable install: build the wheel from a copy of the sources, unpack it, migrate using only it."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("core", "wire", "models", "node", "client", "ledger", "chain", "api", "service"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "nectar/ledger/alembic.ini",
        "nectar/ledger/alembic/env.py",
        "nectar/ledger/alembic/script.py.mako",
        "nectar/ledger/alembic/versions/0001_initial_schema.py",
        "nectar/ledger/alembic/versions/0002_spot_check_slashes.py",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    database = tmp_path / "from-wheel.db"
    script = (
        "import sys, nectar.ledger.migrations as m, nectar.service.migrations as s; "
        "assert all(x.__file__.startswith(sys.argv[1]) for x in (m, s)), (m.__file__, s.__file__); "
        "m.run_migrations(sys.argv[2])"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script, str(site), f"sqlite:///{database}"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    engine = create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == head_revision()
    engine.dispose()
