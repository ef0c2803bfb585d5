"""The adaptive audit rate (issue 21): a node whose pooled CUSUM has risen gets its following receipts picked at a
raised rate, so a small cheat is convicted in far fewer served steps, while an honest node stays at the base rate.

Real parts as in test_pooled_audits.py: each node signs its receipts around a real KV-cached span, receipts go
through the ledger's intake into SQLite, ``SpotChecker`` picks and audits them with two ``LocalVerifier``s.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from nectar.deployment import domain_from_deployment
from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.ledger.intake import check_receipt
from nectar.ledger.migrations import run_migrations
from nectar.ledger.models import Epoch, Node, PooledAudit, Receipt, SpotCheck
from nectar.ledger.spot_check import LocalVerifier, SpotChecker, is_picked
from nectar.models.tiny import save_tiny_checkpoint
from nectar.service.db import get_engine, session_scope
from nectar.wire.fingerprints import POOLED_CUSUM, ComputeSpec
from tests.ledger.test_precision_audits import BLOCKS, DECODE, HIDDEN, MODEL, NodeAudits, noise, serve
from tests.ledger.utils import Party

Q = 0.05  # base rate; the gain and cap are the ledger's defaults
SESSIONS = 50  # 400 served steps per node: about 20 picks at the base rate
STEPS = SESSIONS * (DECODE + 1)


def ledger(root, world, settings):
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        checked = [check_receipt(signed, descriptor, domain_from_deployment()) for signed, descriptor in world["items"]]
        assert all(c.reason is None for c in checked), [c.message for c in checked if c.reason][:3]
        crud.store_receipts(session, checked=checked)
        epoch = crud.close_epoch(session).number
    verifiers = [LocalVerifier({MODEL: world["path"]}, name="a"), LocalVerifier({MODEL: world["path"]}, name="b")]
    checker = SpotChecker(settings=settings, engine=engine, verifiers=verifiers, audit=world["audit"])
    return engine, epoch, checker


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("model") / MODEL, "llama", num_layers=BLOCKS, hidden_size=HIDDEN
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory, path):
    root = tmp_path_factory.mktemp("adaptive")
    settings = Settings(
        database_url=f"sqlite:///{root / 'ledger.db'}", spot_check_fraction=Q, deployment_path=root / "none.json"
    )
    run_migrations(settings.database_url)
    world = dict(path=path, audit=NodeAudits(), client=Party(), items=[], nodes={}, settings=settings)
    serve(world, "honest", computes="bfloat16", claims="bfloat16", sessions=SESSIONS)
    # noise of 2% of the mean magnitude: no single bfloat16 step of 4 blocks fails its tolerance (5.2%), the pooled
    # test convicts it after a few audited steps
    serve(world, "cheat", computes="bfloat16", claims="bfloat16", sessions=SESSIONS, cheat=noise(0.02))
    engine, epoch, checker = ledger(root, world, settings)
    checker.check_epoch(epoch)
    world.update(engine=engine, epoch=epoch)
    return world


def checks(world, name):
    with session_scope(world["engine"]) as session:
        rows = crud.spot_checks_of(session, epoch=world["epoch"])
        return [(c.status, c.detail) for c in rows if c.node == world["nodes"][name]]


def test_a_node_with_a_raised_cusum_is_audited_more_and_convicted_sooner(world):
    cheat, honest = checks(world, "cheat"), checks(world, "honest")
    with session_scope(world["engine"]) as session:
        state = session.scalar(select(PooledAudit).where(PooledAudit.node == world["nodes"]["cheat"]))
        node = session.get(Node, world["nodes"]["cheat"])
        convictions, failed = state.convictions, node.spot_failed
    # at the base rate alone the cheater would get about Q x STEPS = 20 audits, a few convictions at most (each
    # takes some 6 audited steps); behind each audit that raised its CUSUM its next steps were picked at up to the cap
    assert len(cheat) > 2 * len(honest), (len(cheat), len(honest))
    assert convictions >= 6 and failed == convictions, (convictions, failed, len(cheat))
    assert all(detail.startswith("pooled test:") for status, detail in cheat if status == "failed")


def test_an_honest_node_stays_at_the_base_rate_and_is_never_accused(world):
    honest = checks(world, "honest")
    assert [status for status, _ in honest].count("passed") == len(honest)
    assert len(honest) <= 2 * Q * STEPS, len(honest)  # about Q x STEPS; its CUSUM stayed at (or next to) 0


def test_a_carried_cusum_raises_the_next_epochs_picks_from_its_first_receipt(path, tmp_path):
    """A node whose CUSUM stands above 0 when the epoch's picks are fixed (what earlier audits left) has its receipts
    picked at the raised rate from the epoch's first, up to its first pick (where its next audit sets the rate anew);
    the picks are the keyed hash's below the higher bound, a superset of the base picks. The same receipts of a node
    at S = 0 get the base picks only."""
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        spot_check_fraction=0.01,
        spot_check_gain=200.0,
        spot_check_max_fraction=1.0,
        deployment_path=tmp_path / "none.json",
    )
    run_migrations(settings.database_url)
    local = dict(path=path, audit=NodeAudits(), client=Party(), items=[], nodes={}, settings=settings)
    serve(local, "carried", computes="bfloat16", claims="bfloat16", sessions=SESSIONS)
    serve(local, "clean", computes="bfloat16", claims="bfloat16", sessions=SESSIONS)
    engine, epoch, checker = ledger(tmp_path, local, settings)
    threshold = POOLED_CUSUM["bfloat16"][1]
    with session_scope(engine) as session:
        row = PooledAudit(
            node=local["nodes"]["carried"],
            descriptor=ComputeSpec("bfloat16", "none").encode(),
            statistic=0.6 * threshold,
            steps=3,
            last_receipt_id=0,
            window="[]",
        )
        row.convictions = 0
        session.add(row)
    rate = 1.0  # min(cap, q (1 + gain S / H)) = min(1, 0.01 x 121)
    checker.pick(epoch)
    with session_scope(engine) as session:
        seed = bytes(session.get(Epoch, epoch).spot_seed)
        picked = {c.receipt_id for c in session.scalars(select(SpotCheck).where(SpotCheck.epoch_number == epoch))}
        receipts = {
            name: [(r.id, bytes(r.leaf)) for r in session.scalars(select(Receipt).where(Receipt.node == address))]
            for name, address in local["nodes"].items()
        }
    for name, rows in receipts.items():
        rows.sort()
        base = {i for i, leaf in rows if is_picked(seed, leaf, 0.01)}
        expected = set(base)
        if name == "carried":
            first = min(base, default=rows[-1][0] + 1)
            expected |= {i for i, leaf in rows if i < first and is_picked(seed, leaf, rate)}
        assert {i for i, _ in rows} & picked == expected, name
    assert receipts["carried"][0][0] in picked  # the raised rate applies from the epoch's first receipt
