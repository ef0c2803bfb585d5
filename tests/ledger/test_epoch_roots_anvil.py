"""The ledger commits epoch roots in order on a real Anvil (issue 20): an epoch of vouchers only is committed as
(zero root, 0) so the next follows, epochs the chain lacks are committed first, and a root on chain that differs from
the database's is corrected within the challenge period and refused once final. Real SQLite, no Celery: the
``EpochSettler`` the worker runs, called directly."""

from __future__ import annotations

import pytest

from nectar.chain import start_devnet
from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.ledger.intake import check_receipt
from nectar.ledger.migrations import run_migrations
from nectar.ledger.models import Epoch, EpochStatus
from nectar.ledger.settlement import EpochSettler
from nectar.service.db import get_engine, session_scope
from nectar.wire.merkle import merkle_root
from tests.ledger.utils import Party, free_port, make_receipt


@pytest.fixture(scope="module")
def world(tmp_path_factory, contracts_snapshot):
    home = tmp_path_factory.mktemp("epoch-roots")
    devnet = start_devnet(port=free_port(), state_dir=home / "devnet", deployment_path=home / "deployment.json")
    try:
        settings = Settings(database_url=f"sqlite:///{home / 'ledger.db'}", deployment_path=home / "deployment.json")
        run_migrations(settings.database_url)
        chain = devnet.chain()
        nodes = [Party(a["privateKey"]) for a in chain.deployment.accounts if a["role"] == "node"]
        yield {"settings": settings, "engine": get_engine(settings.database_url), "chain": chain, "nodes": nodes}
    finally:
        devnet.stop()


def _close(world, receipts: int) -> int:
    """Store ``receipts`` signed receipts and close the epoch (an empty one when 0); returns its number."""
    domain, client = world["chain"].eip712_domain(), Party()
    checked = [
        check_receipt(*make_receipt(world["nodes"][0], client, step=i, domain=domain), domain) for i in range(receipts)
    ]
    with session_scope(world["engine"]) as session:
        crud.store_receipts(session, checked=checked)
        return crud.close_epoch(session, allow_empty=True).number


def _db_root(world, number: int) -> tuple[bytes, int]:
    with session_scope(world["engine"]) as session:
        epoch = session.get(Epoch, number)
        return bytes(epoch.root), epoch.receipt_count


def _settler(world) -> EpochSettler:
    return EpochSettler(world["settings"], world["engine"], world["chain"])


def test_an_empty_epoch_is_committed_so_the_next_one_follows(world):
    """Before the fix the ledger skipped empty epochs; with roots in order the next commit then reverted
    (``EpochOutOfOrder``) and the ledger was stuck."""
    chain = world["chain"]
    empty = _close(world, 0)
    full = _close(world, 3)
    assert (empty, full) == (1, 2)
    assert _settler(world).run(close=False) == [1, 2]
    assert chain.latest_epoch() == 2
    info = chain.epoch_info(1)
    assert info["committedAt"] > 0 and info["root"] == bytes(32) and info["count"] == 0
    root, count = _db_root(world, 2)
    assert chain.epoch_root(2) == root and count == 3
    with session_scope(world["engine"]) as session:
        assert all(session.get(Epoch, n).status == EpochStatus.SETTLED for n in (1, 2))


def test_epochs_the_chain_lacks_are_committed_first(world):
    """An epoch an older ledger settled without committing (it was empty) is committed before the next one."""
    chain = world["chain"]
    skipped = _close(world, 0)
    with session_scope(world["engine"]) as session:
        session.get(Epoch, skipped).status = EpochStatus.SETTLED  # as the old code left it: never on chain
    following = _close(world, 2)
    assert _settler(world).run(close=False) == [following]
    assert chain.latest_epoch() == following
    assert chain.epoch_info(skipped)["committedAt"] > 0 and chain.epoch_root(skipped) == bytes(32)
    assert chain.epoch_root(following) == _db_root(world, following)[0]


def test_a_different_root_on_chain_is_corrected_in_the_challenge_period(world):
    chain = world["chain"]
    ledger_key = world["settings"].key_for("ledger")
    number = _close(world, 4)
    root, count = _db_root(world, number)
    stale = merkle_root([b"\x01" * 32])  # e.g. committed from a database since restored from a backup
    chain.commit_epoch_root(ledger_key, number, stale, 1)
    assert _settler(world).run(close=False) == [number]
    assert chain.epoch_root(number) == root and chain.epoch_info(number)["count"] == count


def test_a_different_final_root_stops_the_ledger_with_a_clear_error(world):
    chain = world["chain"]
    number = _close(world, 2)
    chain.commit_epoch_root(world["settings"].key_for("ledger"), number, merkle_root([b"\x02" * 32]), 1)
    chain.advance_time(chain.challenge_period())
    with pytest.raises(RuntimeError, match="different, final root on chain"):
        _settler(world).run(close=False)
    with session_scope(world["engine"]) as session:
        assert session.get(Epoch, number).status == EpochStatus.CLOSED  # nothing recorded as committed
