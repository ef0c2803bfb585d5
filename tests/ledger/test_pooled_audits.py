"""The pooled (sequential) audit test (issue 21): small cheats one audited step cannot tell from bfloat16's own
rounding are convicted by a CUSUM over the node's audited steps, and honest bfloat16/float16 nodes never are.

Real parts as in test_precision_audits.py: each node is its own ``ReceiptSigner`` and ``AuditLog`` around a real
KV-cached span, receipts go through the ledger's intake into SQLite, ``SpotChecker`` audits every step (q = 1) with
two ``LocalVerifier``s, and the pooled state lives in the ledger's ``pooled_audits`` table.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from nectar.deployment import domain_from_deployment
from nectar.ledger import crud
from nectar.ledger.core.config import Settings
from nectar.ledger.intake import check_receipt
from nectar.ledger.migrations import run_migrations
from nectar.ledger.models import Node, PooledAudit, Receipt
from nectar.ledger.slashing import case_evidence, evidence_record
from nectar.ledger.spot_check import POOLED_WINDOW, LocalVerifier, SpotChecker
from nectar.models.tiny import save_tiny_checkpoint
from nectar.service.db import get_engine, session_scope
from nectar.wire.receipts import keccak256
from tests.ledger.test_precision_audits import BLOCKS, DECODE, HIDDEN, MODEL, NodeAudits, noise, serve
from tests.ledger.utils import Party

HONEST_SESSIONS = 40  # 320 audited steps per precision here; the calibration replays over 10,000 per precision
CHEAT_SESSIONS = 3  # 24 audited steps


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pooled")
    path = save_tiny_checkpoint(root / MODEL, "llama", num_layers=BLOCKS, hidden_size=HIDDEN)
    settings = Settings(
        database_url=f"sqlite:///{root / 'ledger.db'}", spot_check_fraction=1.0, deployment_path=root / "none.json"
    )
    run_migrations(settings.database_url)
    world = dict(path=path, audit=NodeAudits(), client=Party(), items=[], nodes={})
    for dtype in ("bfloat16", "float16"):
        serve(world, f"honest {dtype}", computes=dtype, claims=dtype, sessions=HONEST_SESSIONS)
    # noise of 2% of the mean magnitude: no single bfloat16 step of 4 blocks fails its tolerance (5.2%)
    serve(
        world, "bfloat16 noise 2%", computes="bfloat16", claims="bfloat16", sessions=CHEAT_SESSIONS, cheat=noise(0.02)
    )
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        checked = [check_receipt(signed, descriptor, domain_from_deployment()) for signed, descriptor in world["items"]]
        assert all(c.reason is None for c in checked), [c.message for c in checked if c.reason][:3]
        crud.store_receipts(session, checked=checked)
        epoch = crud.close_epoch(session).number
    verifiers = [LocalVerifier({MODEL: path}, name="a"), LocalVerifier({MODEL: path}, name="b")]
    SpotChecker(settings=settings, engine=engine, verifiers=verifiers, audit=world["audit"]).check_epoch(epoch)
    world.update(engine=engine, epoch=epoch)
    return world


def checks_of(world, name):
    with session_scope(world["engine"]) as session:
        checks = crud.spot_checks_of(session, epoch=world["epoch"])
        return [(c.id, c.status, c.detail) for c in checks if c.node == world["nodes"][name]]


def test_a_small_noise_bfloat16_cheat_is_convicted_by_the_pooled_test(world):
    checks = checks_of(world, "bfloat16 noise 2%")
    assert len(checks) == CHEAT_SESSIONS * (DECODE + 1)
    failed = [(i, detail) for i, status, detail in checks if status == "failed"]
    assert failed, "the pooled test never convicted a bfloat16 node adding noise of 2% of the mean magnitude"
    assert all(detail.startswith("pooled test:") for _, detail in failed), failed[:1]  # no single step fails
    with session_scope(world["engine"]) as session:
        node = session.get(Node, world["nodes"]["bfloat16 noise 2%"])
        assert node.spot_failed == len(failed)
        # the same case path as any failed audit: the evidence cites the node-signed receipt of the crossing step,
        # and its record (whose hash goes on chain) names every audited receipt of the run
        check = next(c for c in crud.spot_checks_of(session, epoch=world["epoch"]) if c.id == failed[0][0])
        evidence = case_evidence(session, check)
        assert evidence.node == node.address and evidence.record_hash == keccak256(
            evidence_record(check, evidence.leaf)
        )
        cited = check.detail.split("(leaf, score): ")[1].split(", ")
        leaves = {
            "0x" + bytes(r.leaf).hex() for r in session.scalars(select(Receipt).where(Receipt.node == node.address))
        }
        assert cited and all(c.split(" ")[0] in leaves for c in cited)
        assert "0x" + evidence.leaf.hex() == cited[-1].split(" ")[0]  # the crossing step is the case's receipt


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_honest_nodes_are_never_convicted_by_the_pooled_test(world, dtype):
    checks = checks_of(world, f"honest {dtype}")
    assert len(checks) == HONEST_SESSIONS * (DECODE + 1)
    assert not [detail for _, status, detail in checks if status != "passed"][:3]
    with session_scope(world["engine"]) as session:
        state = session.scalar(select(PooledAudit).where(PooledAudit.node == world["nodes"][f"honest {dtype}"]))
        assert state.steps == len(checks) and state.convictions == 0  # every step was scored, none convicted
        assert len(json.loads(state.window)) <= POOLED_WINDOW


def test_pooled_state_is_one_bounded_row_per_node_and_descriptor(world):
    with session_scope(world["engine"]) as session:
        rows = session.scalars(select(PooledAudit)).all()
        assert sorted(r.node for r in rows) == sorted(world["nodes"].values())
        assert all(len(json.loads(r.window)) <= POOLED_WINDOW for r in rows)
